"""services.decode.scheduler: admission, block accounting, continuous batching and preemption.

Plain Python (no model): a test plays the engine's part, calling admit / prefilled / plan_step /
stepped / finish in the order the engine does, and checks the block invariants after each call.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from k2model.sampling_params import SamplingParams
from services.decode.scheduler import Scheduler, Seq, State

TOKEN = 7  # a generated token that is never a stop id unless a test says so


def make_seq(
    name: str, prompt_len: int, max_new: int = 100, stop: frozenset[int] = frozenset()
) -> Seq:
    return Seq(name, list(range(1, prompt_len + 1)), SamplingParams(), 0, max_new, stop)


def admit_all(sched: Scheduler, *seqs: Seq) -> list[Seq]:
    for seq in seqs:
        sched.enqueue(seq)
    return sched.admit()


def check_blocks(sched: Scheduler, seqs: list[Seq]) -> None:
    """Every block is free or owned by exactly one live sequence; done sequences own none."""
    owned = [b for s in seqs for b in s.blocks]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert len(owned) + sched.alloc.num_free == sched.alloc.num_blocks, "a block leaked"
    for s in seqs:
        if s.state in (State.DONE, State.WAITING):
            assert s.blocks == []


def test_admission_is_fifo_and_reserves_prompt_blocks() -> None:
    sched = Scheduler(num_blocks=6, block_size=4, max_running=8, watermark_blocks=1)
    a, b, c = make_seq("a", 8), make_seq("b", 13), make_seq("c", 1)
    admitted = admit_all(sched, a, b, c)
    # a takes 2 blocks; b needs 4 + watermark 1 of the 4 left -> it waits, and c behind it too.
    assert admitted == [a]
    assert len(a.blocks) == 2 and a.state is State.PREFILLING
    assert list(sched.waiting) == [b, c] and b.state is State.WAITING
    check_blocks(sched, [a, b, c])


def test_a_prompt_that_needs_the_whole_pool_is_admitted_when_nothing_else_runs() -> None:
    sched = Scheduler(num_blocks=4, block_size=4, max_running=8, watermark_blocks=1)
    big = make_seq("big", 16, max_new=0)
    assert admit_all(sched, big) == [big]
    assert sched.alloc.num_free == 0


def test_max_running_caps_admission() -> None:
    sched = Scheduler(num_blocks=64, block_size=4, max_running=2)
    seqs = [make_seq(f"s{i}", 3) for i in range(4)]
    assert admit_all(sched, *seqs) == seqs[:2]
    sched.finish(seqs[0])
    assert sched.admit() == [seqs[2]]


def test_first_token_that_is_a_stop_id_finishes_and_frees() -> None:
    sched = Scheduler(num_blocks=8, block_size=4, max_running=8)
    seq = make_seq("s", 5, stop=frozenset({TOKEN}))
    admit_all(sched, seq)
    sched.prefilled(seq, TOKEN)
    assert seq.state is State.DONE and seq.finish_reason == "stop"
    assert sched.alloc.num_free == 8 and sched.plan_step() == []


def test_steps_grow_blocks_at_block_boundaries_and_finish_on_length() -> None:
    sched = Scheduler(num_blocks=8, block_size=4, max_running=8)
    seq = make_seq("s", 4, max_new=6)
    admit_all(sched, seq)
    sched.prefilled(seq, TOKEN)  # out = [t]: the next step writes position 4
    reasons = []
    while seq.state is not State.DONE:
        assert sched.plan_step() == [seq]
        tokens, start = seq.step_tokens()
        assert tokens == [TOKEN] and start == len(seq.prompt) + len(seq.out) - 1
        assert len(seq.blocks) * 4 >= start + 1  # the slot being written is reserved
        reasons.append(sched.stepped(seq, TOKEN))
    assert reasons == [None] * 4 + ["length"] and len(seq.out) == 6
    assert sched.alloc.num_free == 8


def test_preemption_evicts_the_youngest_and_resumes_it_first() -> None:
    sched = Scheduler(num_blocks=4, block_size=2, max_running=8, watermark_blocks=0)
    old, young, late = make_seq("old", 4), make_seq("young", 3), make_seq("late", 1)
    admit_all(sched, old, young)
    sched.prefilled(old, TOKEN)
    sched.prefilled(young, TOKEN)
    sched.enqueue(late)
    # old needs a third block for position 4; the pool is empty, so young is preempted.
    assert sched.plan_step() == [old]
    assert young.state is State.PREEMPTED and young.blocks == []
    assert sched.preemptions == 1 and sched.counts()["queued"] == 2
    assert sched.admit() == []  # nothing new is admitted while a preempted sequence waits
    sched.stepped(old, TOKEN)
    sched.finish(old)
    plan = sched.plan_step()
    assert plan == [young] and young.state is State.PREEMPTED
    tokens, start = young.step_tokens()
    assert (tokens, start) == (young.prompt + young.out, 0)  # recomputes prompt + output
    sched.stepped(young, TOKEN)
    assert young.state is State.RUNNING
    assert sched.admit() == [late]
    check_blocks(sched, [old, young, late])


def test_a_sequence_already_planned_is_never_preempted_in_the_same_plan() -> None:
    """Regression: plan_step could preempt a sequence it had already put in the plan (the victim
    search took the youngest RUNNING sequence, planned or not), so the step ran it with no blocks
    and the decode step failed with "block table too short" for the whole batch."""
    sched = Scheduler(num_blocks=4, block_size=2, max_running=8, watermark_blocks=0)
    old, young = make_seq("old", 3), make_seq("young", 4)
    admit_all(sched, old, young)
    sched.prefilled(old, TOKEN)  # old caches 4 tokens after its step: its 2 blocks suffice
    sched.prefilled(young, TOKEN)  # young needs a third block: none free, old is the only other
    plan = sched.plan_step()
    assert old in plan and old.state is State.RUNNING
    for seq in plan:
        tokens, start = seq.step_tokens()
        assert len(seq.blocks) * 2 >= start + len(tokens)
    check_blocks(sched, [old, young])


def test_finish_is_idempotent_from_every_state() -> None:
    sched = Scheduler(num_blocks=4, block_size=2, max_running=8, watermark_blocks=0)
    waiting, prefilling, running = make_seq("w", 8), make_seq("p", 2), make_seq("r", 2)
    admit_all(sched, running, prefilling, waiting)
    sched.prefilled(running, TOKEN)
    for seq in (waiting, prefilling, running, running):
        sched.finish(seq)
        assert seq.state is State.DONE and seq.blocks == []
    assert sched.alloc.num_free == 4
    assert sched.counts()["queued"] == 0 and sched.counts()["running"] == 0


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 12),
    st.integers(1, 4),
    st.integers(0, 2),
    st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=8),
    st.lists(st.integers(0, 30), max_size=3),
    st.randoms(use_true_random=False),
)
def test_random_workloads_keep_invariants_and_all_finish(
    num_blocks: int,
    block_size: int,
    watermark: int,
    shapes: list[tuple[int, int]],
    abort_at: list[int],
    rng: random.Random,
) -> None:
    sched = Scheduler(num_blocks, block_size, max_running=4, watermark_blocks=watermark)
    seqs = [make_seq(f"s{i}", p, m) for i, (p, m) in enumerate(shapes)]
    seqs = [s for s in seqs if sched.fits_ever(s)]  # the engine refuses the others at submit
    for seq in seqs:
        sched.enqueue(seq)
    for tick in range(2000):
        if all(s.state is State.DONE for s in seqs):
            break
        sched.admit()
        for seq in list(sched.prefilling):  # prefill completes in a random order
            if rng.random() < 0.5:
                sched.prefilled(seq, TOKEN)
        plan = sched.plan_step()
        assert len(plan) == len(set(plan))
        for seq in plan:  # what the model step relies on: every written slot is reserved
            tokens, start = seq.step_tokens()
            assert seq.state in (State.RUNNING, State.PREEMPTED)
            assert len(seq.blocks) * block_size >= start + len(tokens)
        check_blocks(sched, seqs)
        for seq in plan:
            sched.stepped(seq, TOKEN)
        if tick in abort_at:
            sched.finish(rng.choice(seqs))
        check_blocks(sched, seqs)
    assert all(s.state is State.DONE for s in seqs), "a sequence never finished"
    assert sched.alloc.num_free == num_blocks
    for seq in seqs:
        assert seq.finish_reason in (None, "length")
        assert seq.finish_reason is None or len(seq.out) == seq.max_new_tokens
