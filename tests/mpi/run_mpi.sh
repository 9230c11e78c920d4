#!/usr/bin/env bash
# Runs an MPI test program on N ranks: run_mpi.sh N PROGRAM ARGS...
# Skips (exit 77, with the reason) only when mpirun is missing; installed by tools/install-deps.sh.
set -u
n=$1; shift
if ! command -v mpirun >/dev/null 2>&1; then
  echo "SKIP: mpirun not found (Debian: apt-get install openmpi-bin libopenmpi-dev; tools/install-deps.sh does)" >&2
  exit 77
fi
# OpenMPI refuses to run as root without these; --oversubscribe lets N exceed the cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
exec mpirun --oversubscribe --bind-to none -n "$n" "$@"
