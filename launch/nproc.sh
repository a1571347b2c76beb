# Sourced by the launch scripts (not run on its own): how many processes this node starts.
#
# longctx_nproc OVERRIDE CPU_DEFAULT sets `gpus` (the CUDA devices torch sees, 0 without torch or
# CUDA) and `nproc`: OVERRIDE when it is not empty, else the GPU count, else CPU_DEFAULT. On CPU,
# unless OMP_NUM_THREADS is already set, the cores are split over the processes. Uses $PYTHON.
longctx_nproc() {
    gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
    if [[ -n "$1" ]]; then
        nproc="$1"
    elif (( gpus > 0 )); then
        nproc="$gpus"
    else
        nproc="$2"
    fi
    if (( gpus == 0 )) && [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        local cores
        cores="$(nproc 2>/dev/null || echo 1)"
        export OMP_NUM_THREADS=$(( cores / nproc > 0 ? cores / nproc : 1 ))
    fi
}
