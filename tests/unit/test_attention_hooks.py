"""The one mechanism every custom attention function uses (sparsemm_utils.attention_hooks): per-call
state in a context variable, registration with transformers, switching the language model's
attention for a block, and reading the mask a registered function receives. No model is built:
the switch is tested on a stand-in with the two members it touches."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

from sparsemm_utils import attention_hooks as hooks
from sparsemm_utils.attention_hooks import AttentionHook, NoActiveStateError


class _NoActiveThing(NoActiveStateError):
    pass


class _NestedThing(ValueError):
    pass


def _hook(nested_error=None) -> AttentionHook[str]:
    return AttentionHook(
        "sparsemm_test_hook",
        context="a thing() block",
        usage="wrap the call in `with thing():`",
        missing_error=_NoActiveThing,
        nested_error=nested_error,
    )


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _other_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return _attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


# ------------------------------------------------------------------------------------ the state


def test_no_active_state_raises_the_modules_own_error_saying_what_to_do():
    hook = _hook()
    assert hook.current() is None
    with pytest.raises(_NoActiveThing) as info:
        hook.active("sparsemm_test_fn")
    assert str(info.value) == (
        "the attention function 'sparsemm_test_fn' ran outside a thing() block: wrap the call in `with thing():`"
    )
    assert isinstance(info.value, RuntimeError)  # NoActiveStateError is a RuntimeError, as the old errors were


def test_activate_sets_the_state_for_the_block_only():
    hook = _hook()
    with hook.activate("session") as state:
        assert state == "session"
        assert hook.active("fn") == "session" and hook.current() == "session"
    assert hook.current() is None
    with pytest.raises(_NoActiveThing):
        hook.active()


def test_blocks_nest_when_allowed_and_the_outer_state_comes_back():
    hook = _hook()
    with hook.activate("outer"):
        with hook.activate("inner"):
            assert hook.active() == "inner"
        assert hook.active() == "outer"
    assert hook.current() is None


def test_nesting_is_refused_with_the_modules_error_when_asked():
    hook = _hook(nested_error=_NestedThing)
    with hook.activate("outer"):
        with pytest.raises(_NestedThing, match="a thing\\(\\) block is already active; nested contexts are not supported"):
            with hook.activate("inner"):
                pass
        assert hook.active() == "outer"  # the refused block changed nothing
    assert hook.current() is None


def test_the_state_is_reset_after_an_exception():
    hook = _hook()
    with pytest.raises(RuntimeError, match="boom"):
        with hook.activate("session"):
            raise RuntimeError("boom")
    assert hook.current() is None
    with hook.activate("next"):  # a refusing hook can be entered again after the error
        assert hook.active() == "next"


def test_each_thread_sees_its_own_state():
    hook = _hook()
    seen = []
    with hook.activate("main"):
        worker = threading.Thread(target=lambda: seen.append(hook.current()))
        worker.start()
        worker.join()
    assert seen == [None]


def test_bad_hook_arguments_are_refused():
    with pytest.raises(ValueError, match="non-empty name"):
        AttentionHook("", context="c", usage="u")
    with pytest.raises(TypeError, match="subclass of NoActiveStateError"):
        AttentionHook("x", context="c", usage="u", missing_error=RuntimeError)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="exception class"):
        AttentionHook("x", context="c", usage="u", nested_error="nested")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be None"):
        with _hook().activate(None):  # type: ignore[arg-type]
            pass


# ---------------------------------------------------------------------------------- registration


def test_register_is_idempotent_and_registers_the_function_and_its_mask():
    hook = _hook()
    name = "sparsemm_test_hook_attention"
    assert hook.register(name, _attention) == name
    assert hook.register(name, _attention) == name  # again: no change, no error
    assert AttentionInterface()[name] is _attention
    assert ALL_MASK_ATTENTION_FUNCTIONS[name] is sdpa_mask  # the hooks' default: None when causal suffices
    assert dict(hook.functions) == {name: _attention}
    eager_name = name + "_eager"
    hook.register(eager_name, _attention, mask="eager")
    assert ALL_MASK_ATTENTION_FUNCTIONS[eager_name] is eager_mask
    assert set(hook.functions) == {name, eager_name}


def test_register_refuses_a_second_meaning_for_a_name():
    hook = _hook()
    name = "sparsemm_test_hook_two_meanings"
    hook.register(name, _attention)
    with pytest.raises(ValueError, match="refusing to replace it with '_other_attention'"):
        hook.register(name, _other_attention)
    assert AttentionInterface()[name] is _attention and hook.functions[name] is _attention


# ----------------------------------------------------------------------------------- the switch


class _Config:
    def __init__(self, attention: str):
        self._attn_implementation = attention

    def get_text_config(self):
        return self


class _Model:
    """The two members set_text_attention uses: config.get_text_config() and set_attn_implementation."""

    def __init__(self) -> None:
        self.config = _Config("sdpa")
        self.calls: list[dict] = []

    def set_attn_implementation(self, mapping: dict) -> None:
        self.calls.append(mapping)
        self.config._attn_implementation = mapping["text_config"]


def test_text_attention_switches_the_language_model_only_and_restores_it():
    model = _Model()
    name = _hook().register("sparsemm_test_hook_switch", _attention)
    with hooks.text_attention(model, name):
        assert hooks.text_attention_implementation(model) == name
    assert hooks.text_attention_implementation(model) == "sdpa"
    assert model.calls == [{"text_config": name, "vision_config": "sdpa"}, {"text_config": "sdpa", "vision_config": "sdpa"}]


def test_text_attention_restores_after_an_exception_and_nests():
    model = _Model()
    name = _hook().register("sparsemm_test_hook_switch_error", _attention)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.text_attention(model, "eager"):
            with hooks.text_attention(model, name):
                assert hooks.text_attention_implementation(model) == name
                raise RuntimeError("boom")
    assert hooks.text_attention_implementation(model) == "sdpa"
    assert [c["text_config"] for c in model.calls] == ["eager", name, "eager", "sdpa"]


def test_text_attention_refuses_an_unregistered_name_before_touching_the_model():
    model = _Model()
    with pytest.raises(hooks.AttentionNotRegisteredError, match="register_text_attention\\('sparsemm_no_such_fn', fn\\)"):
        with hooks.text_attention(model, "sparsemm_no_such_fn"):
            pass
    assert model.calls == [] and hooks.text_attention_implementation(model) == "sdpa"


def test_models_re_exports_the_same_objects():
    from sparsemm_utils import models

    for name in ("register_text_attention", "set_text_attention", "text_attention_implementation",
                 "vision_attention_implementation", "AttentionNotRegisteredError"):
        assert getattr(models, name) is getattr(hooks, name)


# ------------------------------------------------------------------------------------- the mask


def test_allowed_keys_from_each_mask_kind():
    causal = hooks.allowed_keys(None, 2, 4, "cpu")  # queries at positions 2 and 3
    assert causal.tolist() == [[True, True, True, False], [True, True, True, True]]
    boolean = torch.tensor([[[[True, False, True], [True, True, True]]]])
    assert hooks.allowed_keys(boolean, 2, 3, "cpu").tolist() == [[True, False, True], [True, True, True]]
    additive = torch.tensor([[[[0.0, torch.finfo(torch.float32).min]]]])
    assert hooks.allowed_keys(additive, 1, 2, "cpu").tolist() == [[True, False]]
    with pytest.raises(hooks.AttentionMaskError, match=r"\(1, 1 or heads, q, kv\)"):
        hooks.allowed_keys(torch.ones(2, 1, 1, 2, dtype=torch.bool), 1, 2, "cpu")


def test_an_observing_function_is_sdpa_and_feeds_the_active_state_only():
    """The three moves together, as a layer would call the function: registered, then called with
    and without a state; its output is sdpa's either way."""
    hook = _hook()
    seen = []

    def observe(state, layer_idx, query, key, attention_mask, scaling):
        seen.append((state, layer_idx, tuple(query.shape), tuple(key.shape), attention_mask, scaling))

    fn = hook.observing_sdpa(observe, name="observing_attention", doc="sdpa, observed.")
    assert (fn.__name__, fn.__doc__) == ("observing_attention", "sdpa, observed.")
    name = hook.register("sparsemm_test_hook_observing", fn)
    assert AttentionInterface()[name] is fn
    module = SimpleNamespace(layer_idx=3, num_key_value_groups=2, is_causal=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    out, weights = fn(module, q, k, v, None, scaling=0.25)  # no state: plain sdpa, nothing observed
    assert weights is None and seen == []
    torch.testing.assert_close(out, expected)
    with hook.activate("recorder"):
        out, _ = fn(module, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out, expected)
    assert seen == [("recorder", 3, (1, 4, 5, 8), (1, 2, 5, 8), None, 0.25)]
