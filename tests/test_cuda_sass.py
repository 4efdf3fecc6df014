"""csrc/cuda/sass_report.py's reading of SASS (loops, counts, limits), on a small listing in
cuobjdump's format; the report on real kernels runs in .ci/run (it needs nvcc and cuobjdump)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sass_report", ROOT / "csrc/cuda/sass_report.py")
sass_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_report)

LISTING = [  # (address, opcode, operands) as parse() keeps them
    (0x00, "IMAD", " R1, R2"), (0x10, "CALL.REL.NOINC", " 0x900"),
    # loop 0x20 .. 0x80: 3 HMMA, 3 others (the NOP does not count) and the branch
    (0x20, "LDSM.16.M88.4", " R4, [R5]"), (0x30, "HMMA.16816.F32.BF16", " R8, R4, R6, R8"),
    (0x40, "HMMA.16816.F32.BF16", " R12, R4, R6, R12"), (0x50, "NOP", ""),
    (0x60, "HMMA.16816.F32.BF16", " R16, R4, R6, R16"), (0x70, "FFMA", " R1, R2, R3, R4"),
    (0x80, "BRA", " 0x20"),
    # a loop without MMAs is not reported
    (0x90, "IADD3", " R1, R1, 0x1, RZ"), (0xa0, "BRA", " 0x90"),
    # ptxas's way out of nested loops: a CALL to a label in the body is no subroutine
    (0xb0, "CALL.REL.NOINC", " 0xc0"), (0xc0, "EXIT", ""),
    (0x900, "IMAD.HI.U32", " R1, R2, R3, RZ"), (0x910, "RET.REL.NODEC", " R20 0x0"),
]


def test_subroutine_calls_are_those_past_the_last_exit():
    assert sass_report.subroutine_calls(LISTING) == 1


def test_loop_ratios_count_non_mma_per_mma():
    assert sass_report.loop_ratios(LISTING) == [(3, 1.0)]  # LDSM, FFMA, BRA per 3 HMMA


def test_limits_broken_names_each_limit():
    row = {"kernel": "void minigpt::gpu::(anonymous namespace)::attention_fwd_kernel<__half, 64>"
                     "(minigpt::AttentionParams)", "arch": "sm_90", "regs": 100, "spill": 2,
           "hmma": 4, "ldsm": 2, "call": 1, "bar": 2, "loops": [(4, 5.0)]}
    broken = {b[0] for b in sass_report.limits_broken([row], dict(sass_report.TARGETS))}
    assert broken == {"spill", "call", "fwd hmma/ldsm", "non-MMA per MMA, best loop"}
    lenient = {"spill": 2, "call": 1, "fwd_hmma_per_ldsm": 2.0, "best_loop": 5.0}
    assert sass_report.limits_broken([row], lenient) == []
    assert sass_report.family(row) == "sm_90 v2 attention_fwd_kernel"
    row["kernel"] = row["kernel"].replace("gpu::", "gpu::v1::")
    assert sass_report.family(row) == "sm_90 v1 attention_fwd_kernel"
