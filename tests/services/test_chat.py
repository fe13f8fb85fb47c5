"""Chat templates and stop strings of the OpenAI-compatible API (no cluster needed)."""
import json

import pytest

from epserve.services.router.chat import ChatTemplate, StopMatcher

pytestmark = pytest.mark.unit

# DeepSeek-V3's template, shortened to its user/assistant turns (the shape of tokenizer_config.json's field)
DEEPSEEK_LIKE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ '<｜User｜>' + message['content'] }}{% elif message['role'] == 'assistant' %}"
                 "{{ '<｜Assistant｜>' + message['content'] + eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")


def test_the_checkpoint_s_template_with_its_special_tokens(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": DEEPSEEK_LIKE, "bos_token": {"content": "<｜begin▁of▁sentence｜>"},
        "eos_token": "<｜end▁of▁sentence｜>"}))
    template = ChatTemplate.for_checkpoint(tmp_path)
    text = template.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                            {"role": "user", "content": "More"}])
    assert text == ("<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Yo<｜end▁of▁sentence｜>"
                    "<｜User｜>More<｜Assistant｜>")
    assert template.own


def test_named_templates_and_the_built_in_default(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "no"}, {"name": "default", "template": "{{ messages[0]['content'] }}!"}]}))
    assert ChatTemplate.for_checkpoint(tmp_path).render([{"role": "user", "content": "x"}]) == "x!"
    default = ChatTemplate.for_checkpoint(None)
    assert not default.own
    assert default.render([{"role": "user", "content": "Hi"}]) == "<|user|>Hi\n<|assistant|>"


def test_a_template_cannot_reach_outside_its_sandbox(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages.__class__.__mro__ }}"}))
    with pytest.raises(Exception, match="unsafe|attribute"):
        ChatTemplate.for_checkpoint(tmp_path).render([])


@pytest.mark.parametrize("deltas, stops, emitted, stopped", [
    (["Hel", "lo wor", "ld"], ["lo w"], "Hel", True),             # across deltas
    (["abc", "de"], ["xyz"], "abcde", False),                     # never: everything emitted, nothing held at the end
    (["ab", "c"], ["bd", "c"], "ab", True),                      # "b" held (may start "bd"), then "c" stops
    (["a\n", "\nb"], ["\n\n"], "a", True),
    (["x"], [""], "x", False),                                    # an empty stop string is ignored
])
def test_stop_strings(deltas, stops, emitted, stopped):
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(d) for d in deltas) + matcher.flush()
    assert (out, matcher.stopped) == (emitted, stopped)


def test_held_back_text_is_released_when_it_cannot_start_a_stop():
    matcher = StopMatcher(["END"])
    assert matcher.push("the E") == "the "
    assert matcher.push("N") == ""
    assert matcher.push("d") == "ENd"
