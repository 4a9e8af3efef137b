"""Row formats: what a row may look like, and how it becomes text.

SFT rows:        {text} | {prompt, completion} | {messages}
Preference rows: {prompt, chosen, rejected} where each may be a string or a list of chat
                 messages; chosen/rejected may also be whole conversations that repeat the
                 prompt (UltraFeedback-binarized style), and the prompt column may be absent
                 when chosen and rejected are whole conversations.
Prompt rows:     {prompt} (string or messages), or {messages} (the last assistant turn, if
                 any, is dropped).

Messages are rendered with the tokenizer's chat template. Each function returns text pieces
marked trainable or not, so tokenisation can mask the prompt out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rto.errors import DataError

SFT_FORMATS = "{text}, {prompt, completion} or {messages}"
PREFERENCE_FORMATS = (
    "{prompt, chosen, rejected} (each a string or a list of chat messages), or {chosen, rejected} "
    "as whole conversations"
)
PROMPT_FORMATS = "{prompt} (a string or a list of chat messages) or {messages}"
ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class Piece:
    text: str
    trainable: bool


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


def _as_user(value: Any) -> Any:
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


def _as_reply(value: Any) -> Any:
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else value


def check_messages(value: Any, where: str, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}, column '{column}': expected a non-empty list of chat messages, got {value!r:.80}"
        )
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(
                f"{where}, column '{column}', message {j}: each message needs 'role' and 'content', got {m!r:.80}"
            )
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}, column '{column}', message {j}: unknown role {m['role']!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise DataError(
                f"{where}, column '{column}', message {j}: 'content' must be text, got {type(m['content']).__name__}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_text(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}, column '{column}': expected text, got {type(value).__name__} ({value!r:.60}); "
            "convert the column to strings"
        )
    return value


class ChatRenderer:
    """Renders messages with a tokenizer's chat template; refuses when there is none.

    With `wrap_strings` (config key data.chat_prompts), plain-string prompts and responses are
    treated as a user message and an assistant reply, so a chat model sees its template."""

    def __init__(self, tokenizer: Any, source: str, wrap_strings: bool = False):
        self.tokenizer = tokenizer
        self.source = source
        self.wrap_strings = wrap_strings

    def __call__(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, where: str
    ) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(
                f"{where}: the row holds chat messages but the tokenizer {self.source} has no chat template; "
                "use a tokenizer with a chat template (model.tokenizer), or give the data as plain text "
                "({prompt, completion} / {prompt, chosen, rejected})"
            )
        if not messages:
            return ""
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:
            raise DataError(f"{where}: the chat template failed on this row: {exc}") from None

    def response(
        self, prompt_messages: list[dict[str, str]], reply: dict[str, str], where: str
    ) -> tuple[str, str]:
        """(prompt text with the assistant header, reply text) for one assistant turn."""
        before = self(prompt_messages, True, where)
        after = self(prompt_messages + [reply], False, where)
        if not after.startswith(before):
            raise DataError(
                f"{where}: the chat template does not render the conversation as prompt + reply "
                "(the prompt rendered with add_generation_prompt=True is not a prefix of the whole); "
                "rto cannot tell where the reply starts with this template"
            )
        return before, after[len(before) :]


# --------------------------------------------------------------------------- SFT


def sft_format(columns: list[str]) -> str:
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    return ""


def sft_pieces(
    row: dict[str, Any], fmt: str, render: ChatRenderer, where: str
) -> tuple[list[Piece], bool]:
    """(pieces, from_chat): from_chat pieces were rendered by the chat template, which brings its
    own special tokens; plain text gets the tokenizer's BOS and an EOS added later."""
    if fmt == "text":
        return [Piece(check_text(row.get("text"), where, "text"), True)], False
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if render.wrap_strings:
            prompt, completion = _as_user(prompt), _as_reply(completion)
        if _is_messages(prompt) or _is_messages(completion):
            msgs = check_messages(prompt, where, "prompt")
            reply = check_messages(completion, where, "completion")
            return _chat_pieces(msgs + reply, render, where), True
        pieces = [
            Piece(check_text(prompt, where, "prompt"), False),
            Piece(check_text(completion, where, "completion"), True),
        ]
        return pieces, False
    return _chat_pieces(check_messages(row.get("messages"), where, "messages"), render, where), True


def _chat_pieces(messages: list[dict[str, str]], render: ChatRenderer, where: str) -> list[Piece]:
    """Every assistant turn is trainable; everything else (system, user, headers) is not."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    pieces: list[Piece] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, reply = render.response(messages[:i], m, where)
        if not before.startswith(done):
            raise DataError(
                f"{where}: the chat template rewrites earlier turns, so turns cannot be masked one by one"
            )
        pieces.append(Piece(before[len(done) :], False))
        pieces.append(Piece(reply, True))
        done = before + reply
    rest = render(messages, False, where)
    if rest.startswith(done) and len(rest) > len(done):
        pieces.append(Piece(rest[len(done) :], False))
    return [p for p in pieces if p.text]


# --------------------------------------------------------------------------- preferences


@dataclass
class PreferenceText:
    prompt: str
    chosen: str
    rejected: str
    from_chat: bool  # responses rendered by the chat template (carry their own end-of-turn)


def preference_text(row: dict[str, Any], render: ChatRenderer, where: str) -> PreferenceText:
    for col in ("chosen", "rejected"):
        if col not in row or row[col] is None:
            raise DataError(
                f"{where}: missing column '{col}'; preference rows need {PREFERENCE_FORMATS}"
            )
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if render.wrap_strings:
        prompt, chosen, rejected = _as_user(prompt), _as_reply(chosen), _as_reply(rejected)
    if _is_messages(chosen) or _is_messages(rejected):
        chosen_m = check_messages(chosen, where, "chosen")
        rejected_m = check_messages(rejected, where, "rejected")
        if chosen_m[-1]["role"] != "assistant" or rejected_m[-1]["role"] != "assistant":
            raise DataError(f"{where}: 'chosen' and 'rejected' must end with an assistant message")
        if len(chosen_m) > 1 or len(rejected_m) > 1:  # whole conversations: prompt = shared prefix
            prompt_m = chosen_m[:-1]
            if rejected_m[:-1] != prompt_m:
                raise DataError(
                    f"{where}: 'chosen' and 'rejected' conversations differ before their last reply"
                )
        elif prompt is None:
            raise DataError(
                f"{where}: missing column 'prompt'; preference rows need {PREFERENCE_FORMATS}"
            )
        elif _is_messages(prompt):
            prompt_m = check_messages(prompt, where, "prompt")
        else:
            prompt_m = [{"role": "user", "content": check_text(prompt, where, "prompt")}]
        p_text, c_text = render.response(prompt_m, chosen_m[-1], where)
        _, r_text = render.response(prompt_m, rejected_m[-1], where)
        return PreferenceText(p_text, c_text, r_text, True)
    if prompt is None:
        raise DataError(
            f"{where}: missing column 'prompt'; preference rows need {PREFERENCE_FORMATS}"
        )
    c_text = check_text(chosen, where, "chosen")
    r_text = check_text(rejected, where, "rejected")
    if _is_messages(prompt):
        p_text = render(check_messages(prompt, where, "prompt"), True, where)
    else:
        p_text = check_text(prompt, where, "prompt")
    return PreferenceText(p_text, c_text, r_text, False)


# --------------------------------------------------------------------------- prompts


def prompt_text(row: dict[str, Any], render: ChatRenderer, where: str) -> tuple[str, bool]:
    """The prompt as text, and whether it came from chat messages."""
    if "prompt" in row and row["prompt"] is not None:
        value = _as_user(row["prompt"]) if render.wrap_strings else row["prompt"]
        if _is_messages(value):
            return render(check_messages(value, where, "prompt"), True, where), True
        return check_text(value, where, "prompt"), False
    if "messages" in row and row["messages"] is not None:
        msgs = check_messages(row["messages"], where, "messages")
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return render(msgs, True, where), True
    raise DataError(f"{where}: missing column 'prompt'; prompt rows need {PROMPT_FORMATS}")
