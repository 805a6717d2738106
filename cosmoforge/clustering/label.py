"""Name a cluster and score its educational value by asking a chat model about a few members.

Cosmopedia read ten random extracts per cluster and let the model name the common topic and
score it out of 10; the score is what lets a run drop gossip and obituaries before it spends GPU
hours writing textbooks about them. Models answer loosely (code fences, chatter after the JSON,
"Score: 7/10"), so parsing is forgiving, a malformed answer is retried with a reminder, and a
cluster that never gets a usable answer is recorded as a failure instead of failing the run.

The model is reached through one small callable, `complete(messages) -> str`; `ChatClient` is
the production one: an OpenAI-style `/v1/chat/completions` call, which TGI, vLLM, OpenAI and
the embedded model server all answer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

Message = dict[str, str]
Complete = Callable[[list[Message]], str]

MAX_TOPIC_CHARS = 80

SYSTEM_PROMPT = (
    "You sort web pages into subjects for people who write school and university textbooks. "
    "You answer with a single JSON object and nothing else."
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
    """The labelling conversation for one cluster; extracts are cut to `max_chars` each."""
    numbered = "\n\n".join(
        f"[{number}] {_shorten(text, max_chars)}" for number, text in enumerate(extracts, start=1)
    )
    request = (
        f"A clustering algorithm put the following {len(extracts)} web page extracts in one group.\n\n"
        f"{numbered}\n\n"
        "1. Name the subject these pages have in common, in at most six words.\n"
        "2. Rate from 0 to 10 how useful writing about this subject is for teaching a student: "
        "0 means no educational value (explicit adult content, celebrity gossip, obituaries, "
        "advertising), 10 means material worthy of a textbook.\n\n"
        'Reply with only this JSON object: {"topic": "...", "educational_score": 0}'
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": request}]


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
    messages = build_messages(extracts, max_chars)
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
                *messages[:2],
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


@dataclass
class ChatClient:
    """`complete(messages) -> str` over HTTP against an OpenAI-compatible chat endpoint.

    TGI ignores the model name (it serves one model; "tgi" is its convention); OpenAI needs a
    real one. The key comes from the argument or the engine's own variable (OPENAI_API_KEY for
    openai, HF_TOKEN otherwise), so one provider's key is never sent to another's server.
    """

    base_url: str
    model: str = "tgi"
    engine: str = "tgi"
    api_key: str | None = None
    max_tokens: int = 96
    temperature: float = 0.3
    seed: int | None = 42
    timeout: float = 120.0

    def __post_init__(self) -> None:
        self.url = chat_url(self.base_url)
        key = self.api_key or os.environ.get("OPENAI_API_KEY" if self.engine == "openai" else "HF_TOKEN")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(timeout=self.timeout, headers=headers)

    def __call__(self, messages: list[Message]) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        try:
            response = self._http.post(self.url, json=body)
        except httpx.TimeoutException as error:
            raise EndpointBusy(f"{self.url}: timed out ({error})") from error
        except httpx.TransportError as error:
            raise EndpointBusy(f"{self.url}: {error}") from error
        if response.status_code == 429 or response.status_code >= 500:
            raise EndpointBusy(f"{self.url}: HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise EndpointError(f"{self.url}: HTTP {response.status_code}: {response.text[:300]}")
        return _content(response, self.url)

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
