"""The interpreter's bounds checker (tests/support/sanitizer.py) is on for the whole suite: it must catch a
store or a load one element outside a tensor, before its start, or outside a view inside a larger
buffer, and let masked and in-bounds accesses through."""
import pytest
import torch
import triton
import triton.language as tl

from tests import conftest


@triton.jit
def _copy(src_ptr, dst_ptr, n, load_extra, store_extra, shift, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        x = tl.load(src_ptr + offs + shift, mask=offs < n + load_extra, other=0.0)
        tl.store(dst_ptr + offs, x, mask=offs < n + store_extra)
    else:
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs))


def _run(src, dst, load_extra=0, store_extra=0, shift=0, masked=True, block=16):
    _copy[(triton.cdiv(dst.numel(), block),)](src, dst, dst.numel(), load_extra, store_extra, shift,
                                              BLOCK=block, MASKED=masked)


def test_the_suite_runs_sanitized():
    assert conftest.SANITIZED, "the bounds checker did not install on this triton"


def test_masked_accesses_inside_the_tensors_pass():
    src, dst = torch.randn(37), torch.empty(37)
    _run(src, dst)
    assert torch.equal(src, dst)


def test_a_store_one_past_the_end_is_caught():
    buf = torch.zeros(40)
    with pytest.raises(Exception,
                       match=r"_copy: store of 1 lane.*offset 37 of `dst_ptr`, whose span is \[0, 37\)"):
        _run(torch.randn(37), buf[:37], store_extra=1)
    assert buf[37] == 0


def test_an_unmasked_load_past_the_end_is_caught():
    with pytest.raises(Exception, match=r"load of 12 lane.*offset 20 of `src_ptr`"):
        _run(torch.randn(20), torch.empty(20), masked=False)


def test_a_load_before_the_start_is_caught():
    buf = torch.randn(40)
    with pytest.raises(Exception, match=r"load of 1 lane.*offset -1 of `src_ptr`"):
        _run(buf[3:40], torch.empty(37), shift=-1)


def test_a_view_is_checked_against_its_own_elements_not_its_storage():
    base = torch.randn(3, 40)
    with pytest.raises(Exception, match=r"load of 1 lane.*offset 37 of `src_ptr`"):
        _run(base[1, 2:39], torch.empty(37), load_extra=1)


@triton.jit
def _last_writer(out_ptr):
    tl.store(out_ptr, tl.program_id(0))


@triton.jit
def _neighbour(buf_ptr, BLOCK: tl.constexpr):
    """Program p writes block p, then reads block p - 1: written by another program."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(buf_ptr + offs, offs.to(tl.float32))
    if pid > 0:
        x = tl.load(buf_ptr + offs - BLOCK)
        tl.store(buf_ptr + offs, x + 1.0)


def test_races_are_caught_between_programs_not_within_one():
    from tests.support import sanitizer

    with sanitizer.races():
        _copy[(3,)](torch.randn(40), torch.empty(40), 40, 0, 0, 0, BLOCK=16, MASKED=True)  # no race
        _neighbour[(1,)](torch.empty(16), BLOCK=16)  # one program reads its own stores: no race
        with pytest.raises(Exception,
                           match=r"_last_writer: programs 0 and 1 both store to byte 0 of `out_ptr`"):
            _last_writer[(4,)](torch.zeros(1, dtype=torch.int32))
        with pytest.raises(Exception,
                           match=r"_neighbour: program 1 loads byte 0 of `buf_ptr`, which program 0"):
            _neighbour[(3,)](torch.empty(48), BLOCK=16)
    _last_writer[(4,)](torch.zeros(1, dtype=torch.int32))  # outside the block: not checked
