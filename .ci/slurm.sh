# Sourced by .ci/run: make sure a one-node Slurm cluster (partitions low and high, a job in high
# preempting one in low by REQUEUE) answers here for tests/test_slurm.py, and export
# HARNESS_TEST_SLURM=1 for it.
#
# Uses the cluster running here if it has both partitions; otherwise installs Debian's slurm-wlm
# and munge when missing, writes /etc/slurm/slurm.conf (the recipe of
# ../shared/notes/slurm-local.md) and starts munged, slurmctld and slurmd. If any step fails it
# says why and goes on: the Slurm tests then skip with the reason. `ci_slurm_stop` ends the
# daemons this script started.

ci_slurm_conf=/etc/slurm/slurm.conf

ci_slurm_answers() {  # both partitions up
  command -v sinfo >/dev/null 2>&1 || return 1
  local parts
  parts=$(timeout 10 sinfo -h -o %P 2>/dev/null | tr -d '*' | sort | tr '\n' ' ')
  [ "$parts" = "high low " ]
}

ci_slurm_install() {
  command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 && return 0
  echo "ci: no Slurm here; installing Debian's slurm-wlm and munge"
  if [ "$(id -u)" != 0 ]; then echo "ci: not root: cannot install slurm-wlm"; return 1; fi
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq >/dev/null || { echo "ci: apt-get update failed"; return 1; }
  timeout 900 apt-get install -y -qq slurm-wlm munge >/dev/null || { echo "ci: apt-get install slurm-wlm munge failed"; return 1; }
}

ci_slurm_write_conf() {
  local host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  # KillWait: a preempted (or cancelled, or requeued) job's time to stop cleanly, from SIGTERM to
  # SIGKILL. No GraceTime on low: measured on 22.05, its early SIGTERM goes to job steps only, which
  # a batch job that execs its worker has none of, so the worker heard of its preemption only
  # when the grace time was over (then SIGTERM to every process, and KillWait).
  # MinJobAge: finished jobs stay visible to `scontrol show job` (no accounting database here).
  # sched_interval: the main scheduler's loop, which preempts, every 5 s (measured: at the default
  # 60 s a job in high waited up to a minute for its preemption).
  cat > "$ci_slurm_conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait=30
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=4000 State=UNKNOWN
PartitionName=low Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=high Nodes=$host MaxTime=INFINITE State=UP PriorityTier=10
CONF
}

ci_slurm_start() {
  ci_slurm_install || return 1
  [ "$(id -u)" = 0 ] || { echo "ci: not root: cannot start Slurm's daemons"; return 1; }
  mkdir -p /run/munge
  [ -f /etc/munge/munge.key ] || /usr/sbin/mungekey -c || { echo "ci: mungekey -c failed"; return 1; }
  chown munge:munge /etc/munge/munge.key /run/munge && chmod 400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    su -s /bin/sh munge -c /usr/sbin/munged || { echo "ci: munged does not start"; return 1; }
  fi
  ci_slurm_write_conf
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld || { echo "ci: slurmctld does not start (see /var/log/slurm/slurmctld.log)"; return 1; }
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd || { echo "ci: slurmd does not start (see /var/log/slurm/slurmd.log)"; return 1; }
  for _ in $(seq 30); do ci_slurm_answers && return 0; sleep 1; done
  echo "ci: Slurm started but sinfo does not show partitions low and high"
  return 1
}

ci_slurm_stop() {  # the daemons started here: slurmctld and slurmd by scontrol, munged by its pid
  [ -n "${ci_slurm_started:-}" ] || return 0
  scontrol shutdown >/dev/null 2>&1
  [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null
  ci_slurm_started=
}

ci_slurm_setup() {
  if ! ci_slurm_answers; then
    ci_slurm_start || return 1
    ci_slurm_started=1
  fi
  export HARNESS_TEST_SLURM=1
  echo "ci: Slurm for the Slurm tests: $(sinfo -h -o '%P %a %D %C' | tr '\n' ';')"
}

ci_slurm_setup || echo "ci: going on without Slurm: its tests will skip and say why"
