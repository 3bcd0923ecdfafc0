#!/usr/bin/env bash
# A SLURM pilot job for cr_queue: one crh_worker that uses the whole
# allocation and stops in time.
#
#   sbatch scripts/slurm-pilot.sh                 # one node, 16 CPUs, 24 h
#   sbatch --cpus-per-task=32 --time=12:00:00 scripts/slurm-pilot.sh
#
# The worker runs jobs x threads = the CPUs of the allocation
# (CRH_PILOT_THREADS OpenMP threads per solver, default 4), stops claiming
# CRH_PILOT_MARGIN (default 10 min) before the walltime ends, gives back to the
# queue whatever cannot finish by then, and exits when the queue is empty so
# the allocation is not held idle (CRH_PILOT_QUIT_WHEN_EMPTY=0 keeps it
# waiting for new jobs until the walltime is nearly over).
#
# The database and the solvers come from the usual places (CRH_DATABASE_URL,
# ~/.config/cr_queue/config.toml, /etc/cr_queue/config.toml; CRH_CRTOMO,
# CRH_CRMOD, [solvers]); sbatch exports the submitting shell's environment.
# Extra crh_worker options go after the script name:
#
#   sbatch scripts/slurm-pilot.sh --group big-mesh --nice 5
#
#SBATCH --job-name=crh-pilot
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=crh-pilot-%j.log
set -euo pipefail

say() { echo "slurm-pilot: $*" >&2; }
die() { say "$*"; exit 2; }

threads=${CRH_PILOT_THREADS:-4}
margin=${CRH_PILOT_MARGIN:-600}          # seconds
quit_when_empty=${CRH_PILOT_QUIT_WHEN_EMPTY:-1}
worker=${CRH_WORKER:-crh_worker}
[[ $threads =~ ^[1-9][0-9]*$ ]] || die "CRH_PILOT_THREADS=$threads is not a positive integer"
[[ $margin =~ ^[0-9]+$ ]] || die "CRH_PILOT_MARGIN=$margin must be whole seconds"

# CPUs of this allocation on this node.
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
if [[ -z $cpus ]]; then
    cpus=$(nproc)
    say "no SLURM_CPUS_PER_TASK or SLURM_CPUS_ON_NODE (not under SLURM?): using nproc = $cpus"
fi
[[ $cpus =~ ^[1-9][0-9]*$ ]] || die "cannot read the number of CPUs from '$cpus'"
if (( threads > cpus )); then
    say "CRH_PILOT_THREADS=$threads is more than the $cpus CPUs allocated: using $cpus"
    threads=$cpus
fi
jobs=$(( cpus / threads ))
if (( jobs * threads != cpus )); then
    say "$cpus CPUs are not a multiple of $threads threads: $(( cpus - jobs * threads )) CPU(s) stay idle"
fi

# Seconds until SLURM ends the job: its end time if SLURM exports it, else
# squeue's time left, else CRH_PILOT_WALLTIME (D-HH:MM:SS, HH:MM:SS, MM:SS or minutes).
to_seconds() {
    local text=$1 days=0 h=0 m=0 s=0 parts
    if [[ $text =~ ^([0-9]+)-([0-9]+(:[0-9]+){0,2})$ ]]; then
        days=${BASH_REMATCH[1]}
        IFS=: read -ra parts <<<"${BASH_REMATCH[2]}"
        h=${parts[0]} m=${parts[1]:-0} s=${parts[2]:-0}
    elif [[ $text =~ ^[0-9]+$ ]]; then
        m=$text
    elif [[ $text =~ ^[0-9]+:[0-9]+$ ]]; then
        IFS=: read -r m s <<<"$text"
    elif [[ $text =~ ^[0-9]+:[0-9]+:[0-9]+$ ]]; then
        IFS=: read -r h m s <<<"$text"
    else
        return 1
    fi
    echo $(( 10#$days * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s ))
}

remaining=
if [[ -n ${SLURM_JOB_END_TIME:-} ]]; then
    remaining=$(( SLURM_JOB_END_TIME - $(date +%s) ))
    source="SLURM_JOB_END_TIME"
elif [[ -n ${SLURM_JOB_ID:-} ]] && command -v squeue >/dev/null 2>&1; then
    left=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || true)
    remaining=$(to_seconds "$left") || remaining=
    source="squeue (time left $left)"
fi
if [[ -z $remaining && -n ${CRH_PILOT_WALLTIME:-} ]]; then
    remaining=$(to_seconds "$CRH_PILOT_WALLTIME") || die "CRH_PILOT_WALLTIME=$CRH_PILOT_WALLTIME is not D-HH:MM:SS, HH:MM:SS, MM:SS or minutes"
    source="CRH_PILOT_WALLTIME"
fi
[[ -n $remaining ]] || die "cannot tell when this job ends: run it under sbatch, or set CRH_PILOT_WALLTIME (e.g. 24:00:00)"
max_runtime=$(( remaining - margin ))
(( max_runtime >= 60 )) || die "only ${remaining}s left (from $source), less than the ${margin}s margin plus a minute: nothing to do"

# On scancel (or at the walltime) SLURM sends SIGTERM and kills 30 s later
# (KillWait): running jobs get 20 s to finish, then go back to the queue.
args=(--name "slurm-${SLURM_JOB_ID:-$$}-${HOSTNAME%%.*}"
      --jobs "$jobs" --threads "$threads"
      --max-runtime "${max_runtime}s"
      --drain-timeout 20s)
if [[ $quit_when_empty == 1 ]]; then
    args+=(--quit-when-empty)
fi
say "$jobs job(s) x $threads thread(s) on $cpus CPU(s); stop claiming after ${max_runtime}s (${remaining}s left from $source, margin ${margin}s)"
exec "$worker" "${args[@]}" "$@"
