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

The end-of-turn rule: a reply ends at the first end-of-turn token the chat template closes it
with (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama-3, the EOS for simpler templates), in
every stage. Whatever a template puts after that token (ChatML's newline) belongs to no reply:
it is not trained on, and the reward model is trained, and read in RL, on that token, which is
also where generation stops.

With `data.chat_prompts auto` (the default), plain-string prompts and replies are rendered as a
user turn and an assistant reply when the tokenizer has a chat template, and kept as plain text
when it has none; `true` / `false` force either.
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


def _as_turn(value: Any, role: str, where: str, column: str) -> Any:
    """A plain-text cell as one chat turn; messages (and an absent cell) as they are."""
    if value is None or _is_messages(value):
        return value
    return [{"role": role, "content": check_text(value, where, column)}]


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


def absent(row: dict[str, Any], column: str, where: str, formats: str) -> DataError:
    """The error for a column a row needs: missing from the row, or there but null."""
    if column in row:
        return DataError(
            f"{where}: column '{column}' is null; give every row a value there, or drop the row"
        )
    return DataError(f"{where}: missing column '{column}'; rows need {formats}")


def check_text(value: Any, where: str, column: str) -> str:
    if value is None:
        raise DataError(
            f"{where}: column '{column}' is null; give every row text there, or drop the row"
        )
    if not isinstance(value, str):
        raise DataError(
            f"{where}, column '{column}': expected text, got {type(value).__name__} ({value!r:.60}); "
            "convert the column to strings"
        )
    return value


_PROBE = "rto probe reply 7f3a"


def end_of_turn(tokenizer: Any) -> tuple[str, int] | None:
    """(text, id) of the special token the chat template closes an assistant reply with, or
    None when the tokenizer has no chat template or closes replies with no special token.

    Found by rendering a probe reply and taking the first special or added token after it:
    `<|im_end|>` for ChatML (whose newline after it is not part of the reply), `<|eot_id|>` for
    Llama-3, `<end_of_turn>` for Gemma, the EOS for templates that append it."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:
        return None
    at = text.rfind(_PROBE)
    if at < 0:
        return None
    suffix = text[at + len(_PROBE) :]
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    found = [(suffix.find(t), -len(t), t) for t in specials if t and t in suffix]
    if not found:
        return None
    token = min(found)[2]
    return token, tokenizer.convert_tokens_to_ids(token)


def chat_setting(setting: str | bool, tokenizer: Any) -> bool:
    """Whether plain-string prompts and replies are rendered with the chat template
    (data.chat_prompts: auto = when the tokenizer has one)."""
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    return setting == "true"


def raw_instruction(messages: list[dict[str, str]]) -> str:
    """What a judge or an external benchmark reads as the prompt: the last user turn."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


class ChatRenderer:
    """Renders messages with a tokenizer's chat template; refuses when there is none.

    With `wrap_strings` (config key data.chat_prompts), plain-string prompts and responses are
    treated as a user message and an assistant reply, so a chat model sees its template.
    Replies end at the template's end-of-turn token (`end_of_turn`); `closes_turn` is False when
    the template closes them with no special token, and the tokeniser then appends the EOS."""

    def __init__(self, tokenizer: Any, source: str, wrap_strings: bool | str = False):
        self.tokenizer = tokenizer
        self.source = source
        self.wrap_strings = chat_setting(wrap_strings, tokenizer)
        self.turn_end = end_of_turn(tokenizer)

    @property
    def closes_turn(self) -> bool:
        return self.turn_end is not None

    def describe(self) -> str:
        if not self.wrap_strings:
            return "plain-text prompts kept as they are (chat messages use the chat template)"
        end = f", replies end at {self.turn_end[0]}" if self.turn_end else ""
        return f"plain-text prompts rendered with the tokenizer's chat template{end}"

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
        return before, self.cut_at_turn_end(after[len(before) :], reply["content"])

    def cut_at_turn_end(self, reply_text: str, content: str) -> str:
        """The reply up to and including its end-of-turn token (what follows is no reply's)."""
        if self.turn_end is None:
            return reply_text
        at = reply_text.find(content)
        start = at + len(content) if content and at >= 0 else 0
        end = reply_text.find(self.turn_end[0], start)
        return reply_text if end < 0 else reply_text[: end + len(self.turn_end[0])]


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
            prompt = _as_turn(prompt, "user", where, "prompt")
            completion = _as_turn(completion, "assistant", where, "completion")
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
    # what follows the last reply (ChatML's newline, later user turns) is never trained on
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
        if row.get(col) is None:
            raise absent(row, col, where, PREFERENCE_FORMATS)
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if render.wrap_strings or _is_messages(prompt):
        # replies to a chat prompt are assistant turns, closed by the template's end of turn
        prompt = _as_turn(prompt, "user", where, "prompt")
        chosen = _as_turn(chosen, "assistant", where, "chosen")
        rejected = _as_turn(rejected, "assistant", where, "rejected")
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
            raise absent(row, "prompt", where, PREFERENCE_FORMATS)
        elif _is_messages(prompt):
            prompt_m = check_messages(prompt, where, "prompt")
        else:
            prompt_m = [{"role": "user", "content": check_text(prompt, where, "prompt")}]
        p_text, c_text = render.response(prompt_m, chosen_m[-1], where)
        _, r_text = render.response(prompt_m, rejected_m[-1], where)
        return PreferenceText(p_text, c_text, r_text, True)
    if prompt is None:
        raise absent(row, "prompt", where, PREFERENCE_FORMATS)
    c_text = check_text(chosen, where, "chosen")
    r_text = check_text(rejected, where, "rejected")
    if _is_messages(prompt):
        p_text = render(check_messages(prompt, where, "prompt"), True, where)
    else:
        p_text = check_text(prompt, where, "prompt")
    return PreferenceText(p_text, c_text, r_text, False)


def scored_text(
    prompt: Any, response: str, render: ChatRenderer, where: str
) -> tuple[str, str, bool]:
    """(prompt text, response text, from_chat) of one response to a prompt (a string or
    messages), rendered as `preference_text` renders a row {prompt, chosen: response}: what a
    reward model trained on such rows reads. Used to score text with a reward model whose
    tokenizer is not the policy's."""
    if render.wrap_strings or _is_messages(prompt):
        prompt_m = check_messages(_as_turn(prompt, "user", where, "prompt"), where, "prompt")
        reply = {"role": "assistant", "content": check_text(response, where, "response")}
        p_text, r_text = render.response(prompt_m, reply, where)
        return p_text, r_text, True
    return check_text(prompt, where, "prompt"), check_text(response, where, "response"), False


# --------------------------------------------------------------------------- prompts


@dataclass
class PromptText:
    rendered: str  # what the policy is given (chat template applied for messages)
    raw: str  # what judges and external benchmarks read: the string, or the last user turn
    value: Any  # the prompt as a row holds it (a string or messages), to write it out again
    from_chat: bool


def prompt_text(row: dict[str, Any], render: ChatRenderer, where: str) -> PromptText:
    """The prompt of a prompt row, rendered for the policy and raw for judges."""
    if "prompt" in row and row["prompt"] is not None:
        value = row["prompt"]
        if render.wrap_strings and isinstance(value, str):
            msgs = _as_turn(value, "user", where, "prompt")
            return PromptText(render(msgs, True, where), value, value, True)
        if _is_messages(value):
            msgs = check_messages(value, where, "prompt")
            return PromptText(render(msgs, True, where), raw_instruction(msgs), msgs, True)
        text = check_text(value, where, "prompt")
        return PromptText(text, text, text, False)
    if "messages" in row and row["messages"] is not None:
        msgs = check_messages(row["messages"], where, "messages")
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise DataError(f"{where}, column 'messages': no turn before the assistant's reply")
        return PromptText(render(msgs, True, where), raw_instruction(msgs), msgs, True)
    raise absent(row, "prompt", where, PROMPT_FORMATS)
