"""CompileLog records what Triton's JIT hooks report and leaves the hooks as it found them."""

from types import SimpleNamespace

import pytest

from nanoflow.jit_log import CompileLog, knobs

pytestmark = pytest.mark.skipif(
    not CompileLog().available, reason="this Triton has no JIT cache hooks"
)


def _compile(key: tuple, name: str, signature: str) -> object:
    """What Triton's JIT does around one compilation: the cache hook, then the post hook."""
    fn = SimpleNamespace(name=name)
    answer = knobs.runtime.jit_cache_hook(
        key=key, repr=signature, fn=fn, compile={}, is_manual_warmup=False, already_compiled=False
    )
    knobs.runtime.jit_post_compile_hook(
        key=key, repr=signature, fn=fn, compile={}, is_manual_warmup=False, already_compiled=False
    )
    return answer


def test_records_each_compilation_and_restores_the_hooks():
    before = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    with CompileLog() as log:
        assert _compile(("decode", ("i32",)), "decode", "decode(num_seqs: i32)") is None
        assert _compile(("decode", ("constexpr",)), "decode", "decode(num_seqs: 1)") is None
        assert _compile(("prefill", [1, 2]), "prefill", "prefill(n: i32)") is None
    assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == before
    summary = log.summary()
    assert summary["compilations"] == 3
    assert summary["per_kernel"] == {"decode": 2, "prefill": 1}
    assert summary["cache_keys"][1] == str(("decode", ("constexpr",)))
    # the three stand-in compilations take no real time: seconds are measured, not stamps
    assert summary["seconds"] == pytest.approx(sum(c.seconds for c in log.compilations))
    assert summary["seconds"] < 1.0


def test_chains_the_hooks_it_replaces():
    calls = []

    def cache_hook(**kwargs):
        calls.append(("cache", kwargs["repr"]))
        return True  # a hook that answers "skip the compilation" must still be obeyed

    def post_hook(**kwargs):
        calls.append(("post", kwargs["repr"]))

    runtime = knobs.runtime
    saved = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
    runtime.jit_cache_hook, runtime.jit_post_compile_hook = cache_hook, post_hook
    try:
        with CompileLog() as log:
            assert _compile(("k",), "kern", "kern()") is True
        assert calls == [("cache", "kern()"), ("post", "kern()")]
        assert log.summary()["per_kernel"] == {"kern": 1}
        assert (runtime.jit_cache_hook, runtime.jit_post_compile_hook) == (cache_hook, post_hook)
    finally:
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = saved
