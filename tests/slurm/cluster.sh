#!/bin/bash
# A private SLURM for the tests on this one machine (Debian 12, as root, no init system).
#
#   tests/slurm/cluster.sh start    install (if missing), configure, start; on success
#                                   prints `export SLURM_CONF=<file>` (eval it, or parse it)
#   tests/slurm/cluster.sh stop     stop the SLURM daemons this script started (pid files)
#   tests/slurm/cluster.sh status   exit 0 if every node is up, 1 if not
#
# `start` exits 77 when this machine cannot run a local SLURM (not root, no apt-get/dpkg),
# with the reason as one line on stderr. Any other non-zero status: it should have worked
# and did not; the message names the log to read. `start` is idempotent: a healthy cluster
# is left alone.
#
# The cluster: one controller and two emulated nodes, hpcrl1 and hpcrl2 (two slurmd on
# this machine, `slurmd -N <node>`), 16 CPUs each, partition `debug` (the default);
# hpcrl1 also has one "GPU" (/dev/null as its device file) so `--gpus` requests are
# accepted. So single-node, multi-node, heterogeneous and GPU job scripts can be submitted.
#
# Nothing global changes apart from the Debian packages and munged (one system-wide
# socket, left running by `stop`): configuration, state, spool, logs and pid files all live
# in $HPCRL_SLURM_DIR (default /tmp/hpcrl-slurm), and SLURM commands find the configuration
# through SLURM_CONF=$HPCRL_SLURM_DIR/slurm.conf (sbatch passes it on to jobs with the rest
# of the environment). Ports: HPCRL_SLURM_CTLD_PORT (default 6817) and
# HPCRL_SLURM_SLURMD_PORT (default 6818, and the next one for hpcrl2).
set -u

STATE=${HPCRL_SLURM_DIR:-/tmp/hpcrl-slurm}
CONF=$STATE/slurm.conf
CTLD_PORT=${HPCRL_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${HPCRL_SLURM_SLURMD_PORT:-6818}
START_TIMEOUT_S=${HPCRL_SLURM_START_TIMEOUT_S:-60}
NODES="hpcrl1 hpcrl2"
export SLURM_CONF=$CONF

say() { echo "cluster.sh: $*" >&2; }
cannot() {
	say "cannot run a local SLURM here: $*"
	exit 77
}
die() {
	say "$*"
	exit 1
}

proc_alive() { # proc_alive PID: a live process, not a zombie
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[ "${stat%% *}" != Z ]
}

pid_alive() { # pid_alive FILE: FILE holds the pid of a live process
	local pid
	[ -s "$1" ] || return 1
	pid=$(cat "$1" 2>/dev/null) || return 1
	[ -n "$pid" ] && proc_alive "$pid"
}

node_states() { # one line per node: "<name> <state>" as sinfo reports it
	timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null
}

all_nodes_up() {
	local states name state n=0
	states=$(node_states) || return 1
	while read -r name state; do
		[ -n "$name" ] || continue
		case "$state" in
		idle* | mixed* | allocated* | completing*) n=$((n + 1)) ;;
		*) return 1 ;;
		esac
	done <<<"$states"
	[ "$n" -eq 2 ]
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

daemons_alive() {
	local n
	pid_alive "$STATE/slurmctld.pid" || return 1
	for n in $NODES; do pid_alive "$STATE/slurmd-$n.pid" || return 1; done
}

healthy() { [ -s "$CONF" ] && daemons_alive && munge_ok && all_nodes_up; }

install_packages() {
	command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
		command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
	local pkgs=(slurm-wlm slurmctld slurmd slurm-client munge)
	say "installing ${pkgs[*]} with apt-get"
	export DEBIAN_FRONTEND=noninteractive
	# Another apt-get may hold dpkg's lock for a while: wait for it (bounded).
	local opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=120)
	if ! apt-get install "${opts[@]}" "${pkgs[@]}" >"$STATE/apt.log" 2>&1; then
		say "apt-get install failed; running apt-get update first"
		apt-get update -q -o DPkg::Lock::Timeout=120 >>"$STATE/apt.log" 2>&1 ||
			die "apt-get update failed (see $STATE/apt.log)"
		apt-get install "${opts[@]}" "${pkgs[@]}" >>"$STATE/apt.log" 2>&1 ||
			die "apt-get install ${pkgs[*]} failed (see $STATE/apt.log)"
	fi
	if ! { command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null; then
		die "slurmctld/slurmd/sbatch still missing after apt-get install (see $STATE/apt.log)"
	fi
}

write_conf() {
	local host n
	host=$(hostname -s 2>/dev/null || uname -n)
	host=${host%%.*}
	mkdir -p "$STATE/ctld" "$STATE/log"
	for n in $NODES; do mkdir -p "$STATE/spool/$n"; done
	# AuthInfo cred_expire: a requeued job waits cred_expire + 1 s before it may start
	# again (default 120 s; slurmctld rejects values below 5).
	# sched_interval: the main scheduler's period, which bounds how long an eligible job
	# can sit pending when no event triggers a scheduling pass (default 60 s).
	cat >"$CONF.tmp" <<EOF
# Written by tests/slurm/cluster.sh: a private SLURM for the tests, two emulated nodes.
ClusterName=hpcrl-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
InactiveLimit=0
KillWait=10
MinJobAge=600
GresTypes=gpu
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=hpcrl1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$SLURMD_PORT CPUs=16 RealMemory=2000 Gres=gpu:1 State=UNKNOWN
NodeName=hpcrl2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + 1)) CPUs=16 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=hpcrl[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
	echo "NodeName=hpcrl1 Name=gpu File=/dev/null" >"$STATE/gres.conf"
	mv "$CONF.tmp" "$CONF"
}

start_munge() {
	munge_ok && return 0
	mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
	chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
	chmod 0755 /run/munge
	if [ ! -s /etc/munge/munge.key ]; then
		if command -v mungekey >/dev/null; then
			runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key ||
				die "mungekey --create failed"
		else
			dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
			chown munge:munge /etc/munge/munge.key
		fi
		chmod 0400 /etc/munge/munge.key
	fi
	runuser -u munge -- /usr/sbin/munged </dev/null >"$STATE/log/munged.out" 2>&1 ||
		die "munged did not start: $(tail -n 2 "$STATE/log/munged.out" | tr '\n' ' ')"
	local _
	for _ in $(seq 50); do
		munge_ok && return 0
		sleep 0.2
	done
	die "munged started but 'munge -n | unmunge' fails (see /var/log/munge/munged.log)"
}

start() {
	[ "$(id -u)" = 0 ] || cannot "not root"
	if ! { command -v apt-get && command -v dpkg; } >/dev/null; then
		cannot "no apt-get/dpkg (not Debian-like)"
	fi
	mkdir -p "$STATE" || die "cannot create $STATE"
	if healthy; then
		echo "export SLURM_CONF=$CONF"
		return 0
	fi
	install_packages
	stop_daemons quiet
	write_conf
	mkdir -p "$STATE/log"
	start_munge
	# The daemons fork into the background; their early errors go to *.out (the rest to
	# their log files). No stdio is inherited: a caller capturing our output gets EOF.
	slurmctld </dev/null >"$STATE/log/slurmctld.out" 2>&1 ||
		die "slurmctld did not start: $(tail -n 3 "$STATE/log/slurmctld.out" "$STATE/log/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
	local n
	for n in $NODES; do
		slurmd -N "$n" </dev/null >"$STATE/log/slurmd-$n.out" 2>&1 ||
			die "slurmd -N $n did not start: $(tail -n 3 "$STATE/log/slurmd-$n.out" "$STATE/log/slurmd-$n.log" 2>/dev/null | tr '\n' ' ')"
	done
	local deadline=$((SECONDS + START_TIMEOUT_S)) states=""
	while [ $SECONDS -lt $deadline ]; do
		states=$(node_states | tr '\n' ' ')
		if all_nodes_up; then
			echo "export SLURM_CONF=$CONF"
			return 0
		fi
		# ReturnToService=2 brings a node back by itself once its slurmd registers; a node
		# left down or drained by an earlier run's state is resumed here.
		case "$states" in
		*down* | *drain* | *inval*)
			for n in $NODES; do scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1; done
			;;
		esac
		if ! pid_alive "$STATE/slurmctld.pid"; then
			sleep 1 # slurmctld writes its pid file after forking
			pid_alive "$STATE/slurmctld.pid" ||
				die "slurmctld exited: $(tail -n 3 "$STATE/log/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
		fi
		sleep 1
	done
	die "nodes not up after ${START_TIMEOUT_S}s (sinfo: '${states}'); see $STATE/log/slurmctld.log and $STATE/log/slurmd-*.log"
}

stop_daemons() {
	local name pid _
	for name in $(for n in $NODES; do echo "slurmd-$n"; done) slurmctld; do
		if pid_alive "$STATE/$name.pid"; then
			pid=$(cat "$STATE/$name.pid")
			kill "$pid" 2>/dev/null
			for _ in $(seq 50); do
				proc_alive "$pid" || break
				sleep 0.2
			done
			proc_alive "$pid" && kill -9 "$pid" 2>/dev/null
			[ "${1:-}" = quiet ] || say "stopped $name (pid $pid)"
		fi
		rm -f "$STATE/$name.pid"
	done
}

case "${1:-}" in
start) start ;;
stop) stop_daemons ;;
status)
	healthy || exit 1
	echo "export SLURM_CONF=$CONF"
	;;
*)
	echo "usage: $0 {start|stop|status}" >&2
	exit 2
	;;
esac
