"""Name a cluster and score its educational value by asking a chat model about a few members.

Cosmopedia read ten random extracts per cluster and let the model name the common topic and
score it out of 10; the score is what lets a run drop gossip and obituaries before it spends GPU
hours writing textbooks about them. Models answer loosely (code fences, chatter after the JSON,
"Score: 7/10"), so parsing is forgiving, a malformed answer is retried with a reminder, and a
cluster that never gets a usable answer is recorded as a failure instead of failing the run.

The model is reached through one small callable, `complete(messages) -> str`; `ChatClient` is
the production one: an OpenAI-style `/v1/chat/completions` call, which TGI, vLLM, OpenAI and
the embedded model server all answer. It sends the label's JSON schema as structured output
(`response_format`, in TGI's or OpenAI's spelling), so the server's constrained decoding makes
even a 135M model answer with a topic and an integer score; a server that refuses the field is
asked again without it, once, and the client remembers that.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

Message = dict[str, str]
Complete = Callable[[list[Message]], str]

log = logging.getLogger(__name__)

MAX_TOPIC_CHARS = 80
# What structured output asks for: the topic's length is bounded so a model cannot ramble on
# (and a repeating small model stops), the score is a whole number on the prompt's scale.
LABEL_TOPIC_CHARS = (3, 60)
LABEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "minLength": LABEL_TOPIC_CHARS[0], "maxLength": LABEL_TOPIC_CHARS[1]},
        "educational_score": {"type": "integer", "minimum": 0, "maximum": 10},
    },
    "required": ["topic", "educational_score"],
    "additionalProperties": False,
}
LABEL_SCHEMA_NAME = "cluster_label"

# No persona noun ("librarian"): a 135M model put it into its titles ("Librarian's Guide ...").
SYSTEM_PROMPT = (
    "You sort documents by subject. You read a few extracts, name the subject they share with a "
    "short title, and rate how useful that subject is for teaching. You answer in JSON."
)

_QUESTION = (
    "Which subject are these extracts about? Give it a short title of two to five words, like the "
    "title of a textbook chapter, and rate from 0 to 10 how useful the subject is for teaching "
    "(0: no value, like adverts, gossip, obituaries or adult content; 10: excellent for a textbook)."
)

# Two worked examples, written for this prompt. A 135M model copies the shape of an answer far
# better than it follows a description of one. Each example's title is made of words its extracts
# share, which shows a small model where a title comes from; the low-value example comes first
# because small models lean towards the last answer they saw. Measured on real clusters, this
# named more clusters sensibly than instructions alone or other orders (docs/clustering.md).
_EXAMPLES: tuple[tuple[tuple[str, ...], str, int], ...] = (
    (
        (
            "The celebrity was seen leaving a restaurant with her new boyfriend on Friday night.",
            "Gossip magazines say the celebrity couple will marry in June.",
            "Fans were shocked when the celebrity denied the rumours about her divorce.",
        ),
        "Celebrity gossip",
        1,
    ),
    (
        (
            "Photosynthesis happens in the chloroplasts of leaf cells.",
            "During photosynthesis, plants take in carbon dioxide through small pores in their leaves.",
            "The light reactions of photosynthesis split water and release oxygen.",
        ),
        "Photosynthesis in plants",
        9,
    ),
)

_REMINDER = (
    "Your reply could not be read ({reason}). Reply again with only a JSON object of the form "
    '{{"topic": "<subject in at most six words>", "educational_score": <integer 0-10>}}.'
)


class LabelParseError(ValueError):
    """The model's answer holds no usable topic and score; worth asking again."""


class EndpointBusy(RuntimeError):
    """The endpoint failed in a way that may pass (timeout, 429, 5xx); worth asking again."""


class EndpointError(RuntimeError):
    """The endpoint refused the request (wrong URL, model, key); asking again will not help."""


@dataclass(frozen=True)
class TopicLabel:
    topic: str
    score: float


@dataclass(frozen=True)
class LabelResult:
    """What labelling one cluster gave: a label, or the reason there is none."""

    topic: str | None
    score: float | None
    attempts: int
    error: str | None = None
    raw: str | None = None

    @property
    def ok(self) -> bool:
        return self.topic is not None and self.score is not None


def build_messages(extracts: Sequence[str], max_chars: int = 500) -> list[Message]:
    """The labelling conversation for one cluster; extracts are cut to `max_chars` each.

    The system prompt, two worked examples as earlier turns, then the cluster's extracts with
    the same question: the answer the model should give is the next turn of a pattern.
    """
    messages: list[Message] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for examples, topic, score in _EXAMPLES:
        answer = json.dumps({"topic": topic, "educational_score": score})
        messages += [
            {"role": "user", "content": _request(examples, max_chars)},
            {"role": "assistant", "content": answer},
        ]
    messages.append({"role": "user", "content": _request(extracts, max_chars)})
    return messages


def _request(extracts: Sequence[str], max_chars: int) -> str:
    numbered = "\n\n".join(
        f"Extract {number}: {_shorten(text, max_chars)}" for number, text in enumerate(extracts, start=1)
    )
    return f"{numbered}\n\n{_QUESTION}"


def _shorten(text: str, max_chars: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= max_chars else flat[: max_chars - 1].rstrip() + "…"


# --- parsing -------------------------------------------------------------------------------------

_TOPIC_KEYS = ("topic", "label", "subject", "name", "title", "category")
_SCORE_KEYS = ("educational_score", "education_score", "educational_value", "edu_score", "score", "rating")
_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.DOTALL)
_TOPIC_LINE = re.compile(r"(?im)^[\s*#>{,\-\"']*(?:topic|label|subject|name)[\s*\"']*[:=\-]\s*(.+?)\s*$")
_SCORE_TEXT = re.compile(
    r"(?i)(?:educational[\s_]*(?:value|score)?|score|rating)[\s*\"'()a-z]*[:=\-]?\s*"
    r"(\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*(10|100))?"
)
_SCORE_FRACTION = re.compile(r"(?i)\b(\d+(?:\.\d+)?)\s*(?:/|out of)\s*(10|100)\b")


def parse_label(answer: str) -> TopicLabel:
    """Topic and score from a model's answer; raises `LabelParseError` saying what was wrong."""
    if not answer or not answer.strip():
        raise LabelParseError("empty answer")
    for candidate in _json_candidates(answer):
        topic, score = _from_mapping(candidate)
        if topic is not None or score is not None:
            return _validated(topic, score)
    return _validated(_topic_from_text(answer), _score_from_text(answer))


def _json_candidates(answer: str) -> list[dict[str, Any]]:
    """JSON objects in the answer: fenced blocks first, then any object embedded in prose."""
    texts = [*_FENCE.findall(answer), answer]
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    for text in texts:
        start = text.find("{")
        while start != -1:
            try:
                value, _ = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                found.append(value)
            start = text.find("{", start + 1)
    return found


def _from_mapping(mapping: dict[str, Any]) -> tuple[str | None, float | None]:
    lowered = {str(key).strip().lower().replace(" ", "_"): value for key, value in mapping.items()}
    topic = next((lowered[key] for key in _TOPIC_KEYS if key in lowered), None)
    score = next((lowered[key] for key in _SCORE_KEYS if key in lowered), None)
    return (str(topic) if topic is not None else None), _score_value(score)


def _score_value(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return _score_from_text(value) if not value.strip().replace(".", "", 1).isdigit() else float(value)
    return None


def _topic_from_text(answer: str) -> str | None:
    match = _TOPIC_LINE.search(answer)
    if match is None:
        return None
    value = match.group(1)
    # A broken JSON line ('"topic": "Astronomy", "educational_score": 8') still quotes the name.
    quoted = re.match(r'"([^"]*)"', value)
    return quoted.group(1) if quoted else value


def _score_from_text(answer: str) -> float | None:
    match = _SCORE_TEXT.search(answer) or _SCORE_FRACTION.search(answer)
    if match is None:
        return None
    value = float(match.group(1))
    # "85/100" and "8.5/10" mean the same thing; a bare number is out of 10.
    return value / 10.0 if match.group(2) == "100" else value


def _validated(topic: str | None, score: float | None) -> TopicLabel:
    if topic is None:
        raise LabelParseError("no topic")
    if score is None:
        raise LabelParseError("no educational score")
    clean = _clean_topic(topic)
    if not clean:
        raise LabelParseError("empty topic")
    if not 0.0 <= score <= 10.0:
        raise LabelParseError(f"score {score:g} is outside 0-10")
    return TopicLabel(clean, score)


def _clean_topic(topic: str) -> str:
    line = topic.strip().splitlines()[0] if topic.strip() else ""
    # Models decorate names with markdown, quotes and trailing punctuation; none of it is the name.
    line = line.strip(" \t*_`\"'“”#-:,.;\u2018\u2019")
    if line in {"...", "…"} or set(line) <= {".", "…", " "}:
        return ""
    return line if len(line) <= MAX_TOPIC_CHARS else line[: MAX_TOPIC_CHARS - 1].rstrip() + "…"


# --- asking, with retries -------------------------------------------------------------------------


def label_cluster(
    extracts: Sequence[str],
    complete: Complete,
    *,
    attempts: int = 3,
    max_chars: int = 500,
    wait_seconds: float = 1.0,
) -> LabelResult:
    """Ask for a topic and score, retrying malformed answers and passing endpoint hiccups.

    A malformed answer is sent back with a reminder, so even a greedy model sees a different
    conversation on the next try. `EndpointError` is not caught: a wrong URL or model name
    fails every cluster the same way, and the caller should stop at the first one.
    """
    base = build_messages(extracts, max_chars)
    messages = base
    tries = 0
    last_answer: str | None = None

    def ask() -> TopicLabel:
        nonlocal tries, last_answer, messages
        tries += 1
        answer = complete(messages)
        last_answer = answer
        try:
            return parse_label(answer)
        except LabelParseError as error:
            messages = [
                *base,
                {"role": "assistant", "content": answer[:400]},
                {"role": "user", "content": _REMINDER.format(reason=error)},
            ]
            raise

    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=wait_seconds, max=max(wait_seconds * 8, 0.0)),
        retry=retry_if_exception_type((LabelParseError, EndpointBusy)),
        reraise=True,
    )
    try:
        label = retrying(ask)
    except (LabelParseError, EndpointBusy) as error:
        return LabelResult(None, None, tries, f"{type(error).__name__}: {error}", last_answer)
    return LabelResult(label.topic, label.score, tries, None, last_answer)


# --- the production endpoint -----------------------------------------------------------------------


def chat_url(base_url: str) -> str:
    """`/v1/chat/completions` under a server's base URL, whether or not the base ends in /v1."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def response_format(engine: str, schema: dict[str, Any] = LABEL_SCHEMA) -> dict[str, Any]:
    """`response_format` asking an engine's chat route for JSON under `schema`.

    TGI's Messages API takes `{"type": "json_object", "value": <schema>}` (its `json_schema`
    type also nests the schema under `value`); OpenAI and vLLM take
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": <schema>, "strict": true}}`.
    The embedded model server reads both.
    """
    if engine in ("openai", "vllm"):
        return {
            "type": "json_schema",
            "json_schema": {"name": LABEL_SCHEMA_NAME, "schema": schema, "strict": True},
        }
    return {"type": "json_object", "value": schema}


# Words in a 400/422 answer that say the structured-output field, not the request, was refused:
# TGI ("grammar is not supported", "grammar is not valid"), OpenAI ("Invalid schema for
# response_format ..."), vLLM and others.
_STRUCTURED_REFUSALS = ("response_format", "grammar", "json_schema", "json schema", "structured output")


def refuses_structured_output(status: int, text: str) -> bool:
    """Whether an error answer is about the structured-output field (then: ask without it)."""
    lowered = text.lower()
    return status in (400, 422) and any(word in lowered for word in _STRUCTURED_REFUSALS)


@dataclass
class ChatClient:
    """`complete(messages) -> str` over HTTP against an OpenAI-compatible chat endpoint.

    TGI ignores the model name (it serves one model; "tgi" is its convention); OpenAI needs a
    real one. The key comes from the argument or the engine's own variable (OPENAI_API_KEY for
    openai, HF_TOKEN otherwise), so one provider's key is never sent to another's server.

    With `structured_output` (the default) each request carries the label schema as
    `response_format` in the engine's spelling. When the endpoint answers 400/422 about that
    field (an old TGI, `--disable-grammar-support`, a provider without structured outputs), the
    same request is sent again without it and every later one goes without it too;
    `structured_fallback` keeps the refusal and `output_format` says which way labels were asked.
    Greedy decoding by default: a label is a judgement, not a creative text, and a retry asks a
    different conversation anyway.
    """

    base_url: str
    model: str = "tgi"
    engine: str = "tgi"
    api_key: str | None = None
    max_tokens: int = 96
    temperature: float = 0.0
    seed: int | None = 42
    timeout: float = 120.0
    structured_output: bool = True

    def __post_init__(self) -> None:
        self.url = chat_url(self.base_url)
        key = self.api_key or os.environ.get("OPENAI_API_KEY" if self.engine == "openai" else "HF_TOKEN")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(timeout=self.timeout, headers=headers)
        self._structured = self.structured_output
        self._lock = threading.Lock()
        self.structured_fallback: str | None = None

    @property
    def output_format(self) -> str:
        """How labels are asked for now: `json_schema`, or `prompt` (and why)."""
        if self._structured:
            return "json_schema"
        if self.structured_fallback is not None:
            return f"prompt (structured output refused: {self.structured_fallback})"
        return "prompt"

    def __call__(self, messages: list[Message]) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        structured = self._structured
        if structured:
            body["response_format"] = response_format(self.engine)
        response = self._post(body)
        if structured and refuses_structured_output(response.status_code, response.text):
            self._fall_back(response)
            body.pop("response_format")
            response = self._post(body)
        if response.status_code == 429 or response.status_code >= 500:
            raise EndpointBusy(f"{self.url}: HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise EndpointError(f"{self.url}: HTTP {response.status_code}: {response.text[:300]}")
        return _content(response, self.url)

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        try:
            return self._http.post(self.url, json=body)
        except httpx.TimeoutException as error:
            raise EndpointBusy(f"{self.url}: timed out ({error})") from error
        except httpx.TransportError as error:
            raise EndpointBusy(f"{self.url}: {error}") from error

    def _fall_back(self, response: httpx.Response) -> None:
        with self._lock:  # several clusters are labelled at once: record and warn once
            if not self._structured:
                return
            self._structured = False
            self.structured_fallback = f"HTTP {response.status_code}: {response.text[:200]}"
        log.warning(
            "%s refused structured output; labelling with the prompt alone from now on (%s)",
            self.url,
            self.structured_fallback,
        )

    def close(self) -> None:
        self._http.close()


def _content(response: httpx.Response, url: str) -> str:
    try:
        payload = response.json()
        content = payload["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        # A server that answers 200 with something else is not one we can talk to.
        raise EndpointError(f"{url}: not an OpenAI-style chat completion: {response.text[:200]}") from error
    return content if isinstance(content, str) else ""


# --- the keep rule ---------------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    return {_singular(word) for word in re.findall(r"[a-z0-9]+", text.lower())}


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def excluded_by(topic: str, exclude: Sequence[str]) -> str | None:
    """The first exclusion phrase all of whose words occur in the topic (case and plural blind)."""
    topic_words = _words(topic)
    for phrase in exclude:
        words = _words(phrase)
        if words and words <= topic_words:
            return phrase
    return None


def keep_decision(
    result: LabelResult | None, min_score: float, exclude: Sequence[str]
) -> tuple[bool, str | None]:
    """Whether a cluster's documents seed prompts, and why not when they do not.

    Unlabelled runs (`result is None`) keep everything: there is nothing to judge by. A cluster
    whose labelling failed is dropped, so an unreadable endpoint cannot let gossip through.
    """
    if result is None:
        return True, None
    if not result.ok or result.topic is None or result.score is None:
        return False, "label failed"
    if result.score < min_score:
        return False, f"score {result.score:g} < {min_score:g}"
    phrase = excluded_by(result.topic, exclude)
    if phrase is not None:
        return False, f"excluded topic {phrase!r}"
    return True, None
