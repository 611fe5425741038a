"""The program-order switch of tests/support/program_order.py catches a write race."""
import torch


def test_the_switch_catches_a_write_race(reversed_programs):
    """Every program writes its id to one element: the last writer differs between the orders."""
    import triton
    import triton.language as tl

    @triton.jit
    def last_writer(out_ptr):
        tl.store(out_ptr, tl.program_id(0))

    def fn():
        out = torch.zeros(1, dtype=torch.int32)
        last_writer[(4,)](out)
        return int(out)

    assert fn() == 3
    reversed_programs.enable()
    assert fn() == 0 and reversed_programs.launches == 1
