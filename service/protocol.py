"""Every request and response schema of the HTTP API, errors included (pydantic v2).

Request models forbid unknown fields, so a typo is a 422 naming the field instead of silently ignored
input. `/openapi.json` is generated from these classes, so what is documented is what is enforced.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
)
from pydantic.json_schema import JsonDict
from pydantic_core import PydanticCustomError

from service.engine.client import MAX_TOP_LOGPROBS
from steer_core.data import MAX_OPTIONS, OpinionItem

# External ids (user uid, group gid) appear in URLs: keep them printable and bounded. Match them whole
# (`re.fullmatch`): Python's `$` also matches before a trailing newline.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$"
ID_RULE = "ids are 1 to 200 characters: letters, digits and ._:@- (not starting with a symbol)"
# Profiles and experiments get uuid4 ids from the service.
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
# An API key's display prefix (service.auth.DISPLAY_CHARS characters of the key).
KEY_PREFIX_PATTERN = r"^psk_[A-Za-z0-9_-]{8}$"
PATH_PATTERNS = {"uid": ID_PATTERN, "gid": ID_PATTERN, "profile_id": UUID_PATTERN, "experiment_id": UUID_PATTERN,
                 "prefix": KEY_PREFIX_PATTERN}
# Text the databases store in bounded columns (item ids, end-user names, response ids).
MAX_ID_CHARS = 200
MAX_ITEMS_PER_REQUEST = 10_000
MAX_MEMBERS = 10_000
# Text that holds more than whitespace (and, as all text, no NUL). Opinion items state it in the document
# only: their check is `str.strip()`'s (steer_core.data.make_item), whose whitespace is Python's.
NON_BLANK_TEXT = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
# Limits that depend on the deployment (its model, MAX_NEW_TOKENS, ...): a field names one with
# `json_schema_extra=deployment(...)` and /openapi.json states its value (service.api.openapi).
DEPLOYMENT_KEY = "x-deployment"


def deployment(limit: Literal["served_model", "build_model", "max_new_tokens", "max_profiles",
                              "max_adapter_chars"]) -> dict[str, Any]:
    return {DEPLOYMENT_KEY: limit}


# Every JSON number is also held to +-1e15 (integers: 64 bits) before validation (service.api.openapi.read_json).
Number = StrictInt | StrictFloat
# A profile's weight in a blend: a steering displacement scaled by more than this only breaks the model.
MAX_BLEND_WEIGHT = 100
BlendWeight = Annotated[Number, Field(ge=-MAX_BLEND_WEIGHT, le=MAX_BLEND_WEIGHT)]


class Request(BaseModel):
    """Base of request bodies: unknown fields are errors; no coercion of strings into numbers."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------- errors

class ErrorDetail(Response):
    type: str = Field(description="machine-readable kind, e.g. validation_error, not_found, rate_limited")
    message: str
    field: str | None = Field(None, description="the request field at fault, e.g. items[3].target")


class ErrorResponse(Response):
    error: ErrorDetail


# ------------------------------------------------------------------------------------------- subjects

Attributes = dict[str, Any]


class UserPut(Request):
    attributes: Attributes = Field(default_factory=dict, description="free-form attributes of the user")
    default_profile_id: str | None = Field(
        None, pattern=UUID_PATTERN, description="profile applied to this user's requests when a request names none")


class UserOut(Response):
    uid: str
    attributes: Attributes
    default_profile_id: str | None
    groups: list[str]
    opinions: int = Field(description="number of stored opinion items")
    created_at: datetime
    updated_at: datetime


class GroupPut(Request):
    members: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(default_factory=list, max_length=MAX_MEMBERS,
                               description="uids of existing users; replaces the member list")
    attributes: Attributes = Field(default_factory=dict)


class GroupOut(Response):
    gid: str
    attributes: Attributes
    members: list[str]
    opinions: int = Field(description="number of the group's own opinion items (members' not counted)")
    created_at: datetime
    updated_at: datetime


# ------------------------------------------------------------------------------------------- opinions

# An opinion item's fields as the document states them (steer_core.data.make_item checks them). What it
# cannot state: `target` and `ordinal` have one entry per option, `target` sums to 1, an `answer` index is
# below the number of options and an `answer` text is one of them.
Question = Annotated[str, Field(json_schema_extra={"pattern": NON_BLANK_TEXT})]
Options = Annotated[list[Annotated[str, Field(json_schema_extra={"pattern": NON_BLANK_TEXT})]],
                    Field(min_length=2, max_length=MAX_OPTIONS)]
Probabilities = list[Annotated[Number, Field(ge=0)]]
Answer = Annotated[StrictInt, Field(ge=0, le=MAX_OPTIONS - 1)] | str
ItemId = Annotated[str, Field(max_length=MAX_ID_CHARS)] | StrictInt
_GIVEN: JsonDict = {"not": {"type": "null"}}
_NULL: JsonDict = {"type": "null"}
TARGET_XOR_ANSWER: JsonDict = {"oneOf": [{"required": ["target"], "properties": {"target": _GIVEN, "answer": _NULL}},
                               {"required": ["answer"], "properties": {"answer": _GIVEN, "target": _NULL}}]}


class OpinionIn(Request):
    """One item in the interchange format: exactly one of `target` (a distribution) and `answer`; `target`
    and `ordinal` have one entry per option."""

    model_config = ConfigDict(json_schema_extra=TARGET_XOR_ANSWER)
    id: ItemId | None = None
    question: Question
    options: Options
    ordinal: list[Number] | None = None
    target: Probabilities | None = Field(None, description="probabilities summing to 1")
    answer: Answer | None = Field(None, description="option index or the option's text")


class OpinionsPost(Request):
    items: list[OpinionIn] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)


class OpinionsUploadQuery(Request):
    """How an uploaded table (CSV, JSONL or Parquet body) maps onto opinion items: the column of each field."""

    model_config = ConfigDict(extra="forbid", strict=False)
    question_column: str = "question"
    options_column: str = "options"
    target_column: str = "target"
    answer_column: str = "answer"
    ordinal_column: str = "ordinal"
    id_column: str = "id"


class OpinionOut(Response):
    id: str
    question: str
    options: list[str]
    ordinal: list[float]
    target: list[float]

    @classmethod
    def of(cls, item: OpinionItem) -> OpinionOut:
        return cls(id=item.id or "", question=item.question, options=list(item.options),
                   ordinal=list(item.ordinal), target=list(item.target))


class OpinionsStored(Response):
    stored: int = Field(description="items written by this request (new or replaced)")
    total: int = Field(description="the subject's own items after this request")
    sample_hash: str = Field(description="hash of the sample a profile of this subject would be built from")


class OpinionsQuery(Request):
    model_config = ConfigDict(extra="forbid", strict=False)
    view: Literal["own", "sample"] = Field(
        "own", description="own: the subject's stored items; sample: what a build reads (a group's own "
                           "items plus its members' answers aggregated per question)")


class OpinionsOut(Response):
    subject: SubjectRef
    view: Literal["own", "sample"]
    sample_hash: str
    items: list[OpinionOut]


# ------------------------------------------------------------------------------------------- profiles

class SubjectRef(Response):
    kind: Literal["user", "group"]
    id: str = Field(description="the user's uid or the group's gid")


class SubjectIn(Request):
    kind: Literal["user", "group"]
    id: str = Field(pattern=ID_PATTERN)


# The schema hooks run when the OpenAPI document is built (on a request thread): torch-free imports only.
def _registered_methods(schema: dict[str, Any]) -> None:
    from steer_core.method_names import METHOD_NAMES, POPULATION_METHOD

    schema["enum"] = sorted([*METHOD_NAMES, POPULATION_METHOD])


def _common_params(schema: dict[str, Any]) -> None:
    """The params every method takes (service.api.profiles.check_params); the rest are the method's own."""
    from steer_core.method_spec import ORDERS, POSITIONS

    schema["properties"] = {"layer": {"type": "integer", "minimum": 0}, "strength": {"type": "number", "minimum": 0},
                            "positions": {"enum": list(POSITIONS)}, "orders": {"enum": list(ORDERS)}}


class ProfileCreate(Request):
    subject: SubjectIn
    method: str = Field(description="a registered method, or `population`: a profile fitted against one of "
                                    "your ready populations (`params.population`: its id; nothing else)",
                        json_schema_extra=_registered_methods)
    model: str | None = Field(None, description="base model; default and only choices: the deployment's "
                                                "models", json_schema_extra=deployment("build_model"))
    params: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra=_common_params,
        description="layer, strength and positions fix what is otherwise chosen on held-out items; orders "
                    "2 also fits on every item with its options reversed; the method's own parameters are "
                    "checked by the method")
    contrast: list[SubjectIn] | None = Field(
        None, description="the users or groups this profile is to be told apart from: each item then carries "
                          "their pooled answers to the same question, which group-relative objectives read "
                          "(DiffMean weighs options by the group's share minus theirs; loss 'contrast'). "
                          "Omitted: for a group, the tenant's other groups that answered any of the same "
                          "questions; for a user, none. [] for none. Stored as params.contrast")


BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


class ProfileImport(Request):
    subject: SubjectIn
    adapter_config: dict[str, Any] = Field(description="the content of peft's adapter_config.json (a LoRA "
                                                       "adapter for the served base model, named by its alias "
                                                       "or its hub id; keys peft's LoraConfig does not define "
                                                       "are dropped)")
    adapter_model: str = Field(description="adapter_model.safetensors, base64-encoded (safetensors only: "
                                           "pickled .bin adapters are refused)", json_schema_extra={
                                   "pattern": BASE64_PATTERN, **deployment("max_adapter_chars")})


class Progress(Response):
    done: int
    total: int
    stage: str


class ArtifactRef(Response):
    sha256: str
    size: int


class Estimate(Response):
    mean: float
    standard_error: float | None = Field(description="paired over the items (none for a single item)")


class ProfileVerdict(Response):
    """What a built profile does, in plain words (`steer_core.verdict`), from its out-of-fold metrics."""

    summary: str = Field(description="one sentence: what it serves, whether its answers are near uniform, and "
                                     "its gains over calibrated and uniform with their standard errors")
    improved: bool = Field(description="what it serves beats both the calibrated unsteered model and uniform "
                                       "answers by more than one standard error, out of fold")
    serves: Literal["steering", "calibrated model", "unsteered model"] = Field(
        description="steering: a steering acts on generation; calibrated model: strength 0, only the output "
                    "calibration acts (on option distributions, so chat gets the unsteered model); unsteered model")
    near_uniform: bool = Field(description="its answers sit within 0.05 mean total variation of 1/n per option")
    gain_vs_calibrated: Estimate
    gain_vs_uniform: Estimate
    generation_gain: Estimate | None = Field(
        None, description="what chat gets: the steering alone, uncalibrated, read one option order at a time, "
                          "over the unsteered model (0 when no steering ships)")


class ProfileOut(Response):
    id: str
    subject: SubjectRef
    method: str
    model: str
    params: dict[str, Any]
    status: Literal["queued", "building", "ready", "failed"]
    progress: Progress | None
    error: str | None
    chosen: dict[str, Any] | None = Field(description="hyperparameters the build chose (layer, strength, "
                                                      "...)")
    metrics: dict[str, Any] | None = Field(description="out-of-fold metrics: the baselines (unsteered, uniform, "
                                           "calibrated), steered, gains over unsteered and over calibrated with "
                                           "standard errors, the output calibration, the search, and `per_item`: "
                                           "each item's alignment unsteered, calibrated and steered (capped; "
                                           "`per_item.total` counts the whole sample; in single-profile "
                                           "documents only, not in lists)")
    verdict: ProfileVerdict | None = Field(None, description="what the profile does, said plainly (none while "
                                                             "building, and for imported adapters)")
    artifact: ArtifactRef | None
    sample_hash: str
    version: int
    attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ProfileListQuery(Request):
    model_config = ConfigDict(extra="forbid", strict=False)
    status: Literal["queued", "building", "ready", "failed"] | None = None
    method: str | None = None
    subject_kind: Literal["user", "group"] | None = None
    subject_id: str | None = Field(None, description="with subject_kind")
    limit: int = Field(50, ge=1, le=500)
    after: str | None = Field(None, pattern=UUID_PATTERN, description="the last id of the previous page")


class ProfileList(Response):
    profiles: list[ProfileOut]
    next_after: str | None = Field(description="pass as `after` for the next page; null on the last page")


class ArtifactQuery(Request):
    model_config = ConfigDict(extra="forbid", strict=False)
    format: Literal["safetensors", "gguf", "peft"] = "safetensors"


# ----------------------------------------------------------------------------------------------- keys

class KeyCreate(Request):
    name: str = Field(min_length=1, max_length=200, pattern=NON_BLANK_TEXT, description="what the key is for")


class KeyOut(Response):
    prefix: str = Field(description="the key's first characters: names it in list and revoke")
    name: str | None
    created_at: datetime
    revoked_at: datetime | None
    current: bool = Field(description="the key this request was made with")


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself: shown this once, only its hash is stored")


class KeyList(Response):
    keys: list[KeyOut]


# --------------------------------------------------------------------------------------------- health

class Health(Response):
    status: Literal["ok"]


class ReadyCheck(Response):
    ok: bool
    detail: str


class Ready(Response):
    status: Literal["ready", "loading", "not_ready"] = Field(
        description="ready: database, redis and model all ok; loading: only the model is missing, and it is "
                    "loading (at start-up; fetched and converted first on a fresh home)")
    checks: dict[str, ReadyCheck] = Field(description="database, redis and model gate readiness; artifacts "
                                                      "(profiles whose artifact broke) and, under `pluristeer up`, "
                                                      "stack (its supervised processes) are reported only")
    model: str


# --------------------------------------------------------------------------------------------- models

class ModelSteering(Response):
    """What a `<base>:<profile id>` model steers with (absent on the base model)."""

    profile: str
    subject: SubjectRef
    method: str
    version: int
    verdict: ProfileVerdict | None = Field(None, description="what the profile does, said plainly")


class ModelOut(Response):
    """OpenAI's model object, plus `steering` on a profile's entry."""

    id: str = Field(description="the base model, or `<base>:<profile id>`: pass it as a chat request's `model`")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds: the profile's creation (0 for the base model)")
    owned_by: str
    steering: ModelSteering | None = None


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelOut]


OpinionsOut.model_rebuild()


# ==================================================================================================== chat
# Chat completions and scores.

Role = Literal["system", "developer", "user", "assistant"]
MAX_STOP_STRINGS = 4
MAX_CHOICES = 8  # `n`: each choice is one more row in the engine's batch
MAX_SCORE_QUESTIONS = 256


MaybeNumber = TypeVar("MaybeNumber", bound=float | None)


def _finite(value: MaybeNumber) -> MaybeNumber:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(Request):
    role: Role = Field(description="system, developer, user or assistant")
    content: str | list[TextPart] = Field(description="text, or a list of text parts (joined)")
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ProfileWeight(Request):
    id: str = Field(pattern=UUID_PATTERN, description="a ready profile of this tenant, built for the served model")
    weight: BlendWeight = Field(1.0, description="its weight in the blend (negative steers away)")

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float) -> float:
        return _finite(value)


class SteeringIn(Request):
    """How to steer one request. Give `profiles`, or an `experiment` (with the request's `user`), or
    nothing: then the request's `user` gets their default profile, optionally blended with their groups'
    newest ready profiles at `groups_weight` each."""

    model_config = ConfigDict(json_schema_extra={"not": {
        "required": ["profiles", "experiment"],
        "properties": {"profiles": {"type": "array", "minItems": 1}, "experiment": {"type": "string"}}}})
    profiles: list[ProfileWeight] | None = Field(None, description="the blend: profile ids and weights",
                                                 json_schema_extra=deployment("max_profiles"))
    positions: Literal["prompt", "last", "all"] | None = Field(
        None, description="override every profile's steered positions")
    experiment: str | None = Field(None, pattern=UUID_PATTERN,
                                   description="an A/B experiment: the user's variant gives the blend")
    groups_weight: BlendWeight | None = Field(
        None, description="with `user` and no profiles: add each of the user's groups' newest ready profile "
                          "at this weight to the user's default profile")

    @field_validator("groups_weight")
    @classmethod
    def _groups_weight(cls, value: float | None) -> float | None:
        return _finite(value)


class StreamOptions(Request):
    include_usage: bool = False


# OpenAI chat fields this server does not implement -> the values that ask for what it does anyway.
UNSUPPORTED_CHAT_FIELDS: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "tools": ([],), "tool_choice": ("none",),
    "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "logit_bias": ({},), "audio": (), "modalities": (["text"],),
    "prediction": (), "reasoning_effort": (), "verbosity": (), "web_search_options": (),
}


def _state_chat_rules(schema: dict[str, Any]) -> None:
    """Each unsupported field as the document states it (the values that ask for what the server does
    anyway, or null), and `top_logprobs` only with `logprobs: true`."""
    for name, accepted in UNSUPPORTED_CHAT_FIELDS.items():
        values: list[Any] = []
        for value in (*accepted, None):
            if value not in values:  # 0 and 0.0 are one JSON number
                values.append(value)
        schema["properties"][name]["enum"] = values
    schema["not"] = {"required": ["top_logprobs"],
                     "properties": {"top_logprobs": {"type": "integer"}, "logprobs": {"not": {"const": True}}}}


class ChatCompletionRequest(Request):
    """OpenAI's chat completion request (no tools, no penalties) plus `steering`."""

    model_config = ConfigDict(json_schema_extra=_state_chat_rules)

    model: str = Field(description="the served base model, or `<base>:<profile id>` for one profile",
                       json_schema_extra=deployment("served_model"))
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, description="new tokens at most (default: the "
                                                                 "deployment's DEFAULT_MAX_TOKENS; limit: its "
                                                                 "MAX_NEW_TOKENS)",
                                         json_schema_extra=deployment("max_new_tokens"))
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="same as max_tokens (give one, or "
                                                                            "both equal)",
                                                    json_schema_extra=deployment("max_new_tokens"))
    temperature: Number = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: Number = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_STRINGS} stop strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_ID_CHARS,
                             description="the tenant's user uid: their default profile and experiments")
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES, description="choices to generate, each an independent sample "
                         "(with `seed`, choice i samples with seed + i)")
    logprobs: bool | None = Field(None, description="return each generated token's log-probability: the "
                                  "model's log-softmax at that step, steering applied, before temperature and "
                                  "top_p")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with `logprobs`: this "
                                           "many most likely tokens at each step, most likely first")
    presence_penalty: Any = Field(0, description="unsupported beyond 0")
    frequency_penalty: Any = Field(0, description="unsupported beyond 0")
    steering: SteeringIn | None = None
    # OpenAI metadata that cannot change the output: accepted and ignored.
    metadata: dict[str, str] | None = Field(None, description="accepted and ignored")
    store: bool | None = Field(None, description="accepted and ignored (nothing is stored)")
    service_tier: str | None = Field(None, description="accepted and ignored")
    prompt_cache_key: str | None = Field(None, description="accepted and ignored")
    safety_identifier: str | None = Field(None, description="accepted and ignored")
    parallel_tool_calls: bool | None = Field(None, description="accepted and ignored (no tools are called)")
    # OpenAI fields this server does not implement: a 422 naming the field, unless the value asks for
    # what the server does anyway (`tools: []`, `response_format: {"type": "text"}`, ...).
    tools: Any = Field(None, description="unsupported: no tool calls")
    tool_choice: Any = Field(None, description="unsupported beyond \"none\"")
    functions: Any = Field(None, description="unsupported")
    function_call: Any = Field(None, description="unsupported beyond \"none\"")
    response_format: Any = Field(None, description="unsupported beyond {\"type\": \"text\"}")
    logit_bias: Any = Field(None, description="unsupported beyond {}")
    audio: Any = Field(None, description="unsupported")
    modalities: Any = Field(None, description="unsupported beyond [\"text\"]")
    prediction: Any = Field(None, description="unsupported")
    reasoning_effort: Any = Field(None, description="unsupported")
    verbosity: Any = Field(None, description="unsupported")
    web_search_options: Any = Field(None, description="unsupported")

    @field_validator(*UNSUPPORTED_CHAT_FIELDS)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        accepted = UNSUPPORTED_CHAT_FIELDS[info.field_name or ""]
        if value is None or any(value == ok and type(value) is type(ok) for ok in accepted):
            return value
        raise PydanticCustomError("unsupported", "{field} is not supported by this server: it generates plain "
                                  "text", {"field": info.field_name})

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("temperature", "top_p")
    @classmethod
    def _numbers(cls, value: float) -> float:
        return _finite(value)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class AppliedProfile(Response):
    id: str
    weight: float
    version: int
    method: str
    layer: int
    strength: float


class SteeringOut(Response):
    """What steered a response."""

    source: Literal["none", "request", "model", "user", "experiment"] = Field(
        description="where the blend came from: the request's profiles, the model shorthand, the user's "
                    "defaults, an experiment, or none (unsteered)")
    profiles: list[AppliedProfile]
    positions: str | None = None
    user: str | None = None
    experiment: str | None = None
    variant: str | None = None


class ChatMessageOut(Response):
    role: Literal["assistant"]
    content: str


class TopLogprob(Response):
    token: str = Field(description="the token's text (U+FFFD for a part of a character that the token holds "
                                   "without the rest)")
    logprob: float
    bytes: list[int] = Field(description="the token's UTF-8 bytes (a character split across tokens: each has "
                                         "its part)")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="the most likely tokens at this step, most likely first "
                                                       "(`top_logprobs` of them)")


class ChoiceLogprobs(Response):
    """Log-probabilities of a choice's tokens (of a streamed chunk's tokens: those whose text it completes).
    A stop string that cuts a token keeps that token whole; the stop token itself is not listed."""

    content: list[ChatTokenLogprob]
    refusal: None = None


class ChatChoice(Response):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = Field(None, description="with `logprobs: true`")


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int = Field(description="every choice's tokens")
    total_tokens: int


class ChatCompletion(Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str = Field(description="the request's `model`, as sent (`<base>:<profile id>` included)")
    choices: list[ChatChoice]
    usage: Usage
    steering: SteeringOut
    system_fingerprint: str | None = None


class ChatDelta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(Response):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(Response):
    """One server-sent event of a streamed completion (`data: {...}`); the stream ends with `data: [DONE]`.
    The first chunk carries `steering` and each choice's role; then each chunk carries one choice's new
    text (and its tokens' `logprobs` when asked for); each choice ends with a chunk carrying its
    `finish_reason`; with `stream_options.include_usage`, a last chunk without choices carries `usage`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str = Field(description="the request's `model`, as sent (`<base>:<profile id>` included)")
    choices: list[ChunkChoice]
    usage: Usage | None = None
    steering: SteeringOut | None = None


class ScoreQuestion(Request):
    """A multiple-choice question; `target` or `answer` (at most one) add alignment metrics to the response."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["target", "answer"],
                                                         "properties": {"target": _GIVEN, "answer": _GIVEN}}})
    id: ItemId | None = None
    question: Question
    options: Options
    ordinal: list[Number] | None = None
    target: Probabilities | None = Field(None, description="probabilities summing to 1")
    answer: Answer | None = None


class ScoreRequest(Request):
    model: str | None = Field(None, description="the served base model (default), or `<base>:<profile id>`",
                              json_schema_extra=deployment("served_model"))
    questions: list[ScoreQuestion] = Field(min_length=1, max_length=MAX_SCORE_QUESTIONS)
    steering: SteeringIn | None = None
    user: str | None = Field(None, max_length=MAX_ID_CHARS)
    calibrated: bool = Field(True, description="apply the steering profiles' own output calibration (a "
                                               "temperature and ordinal lean their builds fitted; a blend pools "
                                               "them by weight); false: the raw steered distribution")
    orders: Literal[1, 2] = Field(
        2, description="2 (default): each question is read with its options as given and reversed, and the two "
                       "distributions averaged (mapped back to the order given), so the answer does not depend on "
                       "which letter an option got; two reads per question. 1: the order given only (half the "
                       "reads; the model's letter bias stays in, as in chat)")


class CalibrationOut(Response):
    temperature: float
    lean: float = Field(description="the ordinal lean (with `lean_per_question`: the profiles' recorded leans "
                                    "blended; each question's own is in its score)")
    lean_per_question: bool = Field(False, description="a profile read each question's lean off its prompt "
                                                       "(a question lean): the lean differs by question")


class QuestionScore(Response):
    id: str | None
    probs: list[float] = Field(description="the answer distribution over the options, in order")
    answer: int = Field(description="index of the most likely option")
    expected_ordinal: float = Field(description="the distribution's mean ordinal position")
    lean: float | None = Field(None, description="the ordinal lean of this question's calibration, when a "
                                                 "profile reads it off the question (a question lean)")


class ScoreResponse(Response):
    model: str
    scores: list[QuestionScore]
    metrics: dict[str, float] | None = Field(
        None, description="alignment, total variation, KL, accuracy, ... when every question has a target or "
                          "an answer (steer_core.metrics.summarize)")
    steering: SteeringOut
    calibration: CalibrationOut | None = Field(
        None, description="the output calibration applied to every distribution (none: the identity)")


# ============================================================================================= experiments
# A/B tests.

VARIANT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"
MAX_VARIANTS = 16
RewardKind = Literal["thumbs", "rating", "number"]
ExperimentState = Literal["scheduled", "running", "paused", "stopped", "ended"]


class ProfileWeightIn(Request):
    id: str = Field(pattern=UUID_PATTERN, description="a ready profile of this tenant (once per blend)")
    weight: Number = Field(1.0, ge=0, le=MAX_BLEND_WEIGHT, description="the profile's weight in the variant's "
                                                                     "blend")


class VariantIn(Request):
    name: str = Field(pattern=VARIANT_NAME_PATTERN, description="unique within the experiment")
    weight: Number = Field(1.0, ge=0, description="traffic weight, relative to the other variants' (the "
                                                  "weights must sum to more than 0)")
    profiles: list[ProfileWeightIn] = Field(default_factory=list, json_schema_extra=deployment("max_profiles"),
                                            description="the blend this variant applies; empty: unsteered")


class ScopeIn(Request):
    group: str = Field(pattern=ID_PATTERN, description="only this group's members take part")


class ExperimentCreate(Request):
    name: str = Field(min_length=1, max_length=200)
    variants: list[VariantIn] = Field(min_length=2, max_length=MAX_VARIANTS)
    control: str | None = Field(None, description="the variant the others are compared with (default: the "
                                                  "first); it is also served while the experiment is not running")
    reward: RewardKind = Field("thumbs", description="what feedback carries: thumbs (up/down), rating (1 to 5) "
                                                     "or number (any finite value)")
    scope: ScopeIn | None = None
    starts_at: AwareDatetime | None = Field(None, strict=False, description="default: now")
    ends_at: AwareDatetime | None = Field(None, strict=False, description="after starts_at and in the future; "
                                                                     "default: open-ended (until stopped)")


class ExperimentPatch(Request):
    weights: dict[str, Annotated[Number, Field(ge=0)]] | None = Field(
        None, description="new traffic weights by variant name (others keep theirs); users already "
                          "assigned keep their variant")
    ends_at: AwareDatetime | None = Field(None, strict=False, description="in the future")


class ProfileWeightOut(Response):
    id: str
    weight: float


class VariantOut(Response):
    name: str
    weight: float
    share: float = Field(description="the weight over the sum of weights: the share of new users")
    profiles: list[ProfileWeightOut]
    is_control: bool
    assigned: int = Field(description="users assigned so far")


class ScopeOut(Response):
    group: str


class ExperimentOut(Response):
    id: str
    name: str
    status: Literal["running", "paused", "stopped"] = Field(description="what was set by create/pause/resume/stop")
    state: ExperimentState = Field(description="status seen through the time window: scheduled before "
                                               "starts_at, ended after ends_at")
    reward: RewardKind
    control: str
    scope: ScopeOut | None
    starts_at: datetime
    ends_at: datetime | None
    stopped_at: datetime | None
    created_at: datetime
    updated_at: datetime
    variants: list[VariantOut]


class ExperimentList(Response):
    experiments: list[ExperimentOut]
    next_after: str | None


class ExperimentListQuery(Request):
    model_config = ConfigDict(extra="forbid", strict=False)
    limit: int = Field(50, ge=1, le=500)
    after: str | None = Field(None, pattern=UUID_PATTERN, description="the last id of the previous page")


class AssignIn(Request):
    user: str = Field(pattern=ID_PATTERN)


class AssignmentOut(Response):
    experiment_id: str
    user: str
    variant: str
    profiles: list[ProfileWeightOut]
    live: bool = Field(description="false while the experiment is not running: the control is served and "
                                   "nothing is stored")


class FeedbackIn(Request):
    """Exactly one of `thumbs`, `rating` and `value`, the one the experiment's `reward` names."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": [given], "properties": {name: _GIVEN if name == given else _NULL
                                             for name in ("thumbs", "rating", "value")}}
        for given in ("thumbs", "rating", "value")]})

    response_id: str = Field(min_length=1, max_length=200, description="the id of the chat completion")
    thumbs: Literal["up", "down"] | StrictBool | None = Field(None, description="up/down or true/false")
    rating: StrictInt | None = Field(None, ge=1, le=5)
    value: Number | None = None


class FeedbackOut(Response):
    experiment_id: str
    response_id: str
    variant: str
    user: str
    kind: RewardKind
    reward: float = Field(description="the numeric reward: thumbs up 1, down 0; the rating; the value")
    created: bool = Field(description="false when this response already had feedback (it is replaced)")
    created_at: datetime
    updated_at: datetime


class RewardStats(Response):
    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    successes: int | None = Field(description="thumbs up (thumbs only)")


class ControlComparison(Response):
    test: Literal["welch_t", "two_proportion_z", "barnard_exact"] = Field(
        description="welch_t: Welch's t-test (ratings, numbers); thumbs: barnard_exact, Barnard's exact "
                    "unconditional score test, while an expected cell count of the 2x2 table is under 5 (and "
                    "neither side has over 50 rewards), else two_proportion_z, the pooled z-test (chi-square "
                    "without correction)")
    difference: float | None = Field(description="mean reward minus the control's")
    ci_low: float | None = Field(description="the interval of the difference: the differences the same test "
                                             "does not reject (inside [-1, 1] for thumbs); null without a test")
    ci_high: float | None
    statistic: float | None
    p_value: float | None = Field(description="two-sided; null while a side has fewer than min_per_arm rewards")
    df: float | None
    significant: bool = Field(description="p_value < alpha, which is exactly when the interval excludes 0; "
                                          "false while there is not enough data")
    enough_data: bool = Field(description="both sides have at least min_per_arm rewards")
    verdict: Literal["not enough data", "better", "worse", "no significant difference"]


class Gain(Response):
    mean: float
    standard_error: float | None = Field(description="paired over the items (none for a single item)")


class OfflineScores(Response):
    alignment: float
    total_variation: float
    kl: float
    gain_vs_unsteered: Gain | None = Field(None, description="mean alignment gain over the unsteered model")
    gain_vs_uniform: Gain | None = Field(
        None, description="mean alignment gain over answering 1/n per option (a profile that only flattens an "
                          "over-confident model gains over unsteered, not over this)")
    gain_vs_calibrated: Gain | None = Field(
        None, description="mean alignment gain over the unsteered model with an output calibration fitted on "
                          "these items out of fold (what flattening alone gives; none under 4 items)")


class VariantResult(Response):
    name: str
    is_control: bool
    weight: float
    profiles: list[ProfileWeightOut]
    assigned: int
    exposures: int
    feedback: int
    reward: RewardStats
    share: float = Field(description="the share of new users the traffic weights ask for: weight / sum of weights")
    observed_share: float | None = Field(description="assigned / all assigned users; null before anyone is")
    vs_control: ControlComparison | None = Field(description="null for the control")
    offline: OfflineScores | None = Field(description="alignment with the scope's opinion items (see `offline`)")


class OfflineComparison(Response):
    available: bool
    status: Literal["ready", "queued", "running", "failed", "none"] = Field(
        description="ready: stored and shown; queued/running: a worker computes it, ask again; failed: see "
                    "detail; none: nothing to compare (no scope, no items, not requested)")
    detail: str
    items: int
    evaluation: Literal["held-out", "in-sample"] | None = Field(
        description="held-out: items in no compared profile's sample; in-sample: every scope item is in some "
                    "compared profile's sample (scores that flatter those profiles)")
    sample_hash: str | None


class ResultsQuery(Request):
    model_config = ConfigDict(extra="forbid", strict=False)
    offline: bool = Field(True, description="the offline comparison of the variants on the scope's opinion "
                                            "items: asked of a worker the first time, then read back")


class SampleRatioCheck(Response):
    unit: Literal["assigned users"] = Field(description="what is counted: users, the unit of assignment "
                                                        "(exposures per user differ by variant)")
    statistic: float | None
    p_value: float | None = Field(description="chi-square goodness of fit of the assigned users per variant "
                                              "against the shares of the current weights (variants of weight 0 "
                                              "left out); null with under two such variants or nobody assigned")
    threshold: float = Field(description="a mismatch is flagged below this p-value")
    enough_data: bool = Field(description="every expected count is at least 5 (the chi-square approximation)")
    mismatch: bool = Field(description="p_value < threshold with enough data: the split is not what the weights "
                                       "ask (broken assignment or logging, or weights changed mid-experiment); "
                                       "the comparison may be biased")


class ExperimentResults(Response):
    experiment_id: str
    name: str
    state: ExperimentState
    reward: RewardKind
    control: str
    confidence: float
    alpha: float
    min_per_arm: int = Field(description="rewards each side needs before a comparison gives a verdict")
    sample_ratio: SampleRatioCheck
    variants: list[VariantResult]
    winner: str | None = Field(description="the variant with the best mean among those significantly better "
                                           "than the control; null if none is")
    offline: OfflineComparison


# ----------------------------------------------------------------------------------------------- populations

class PopulationCreate(Request):
    name: str = Field(pattern=ID_PATTERN, description="unique among the tenant's populations")
    subjects: list[SubjectIn] | None = Field(
        None, min_length=2, max_length=200,
        description="the users or groups it learns from, answering at least 10 of the same questions (same text "
                    "and options); the questions all of them answered are used. Omitted: every group of the tenant")
    model: str | None = Field(None, description="base model; default and only choices: the deployment's models",
                              json_schema_extra=deployment("build_model"))


class PopulationOut(Response):
    id: str
    name: str
    model: str
    subjects: list[SubjectRef]
    status: Literal["queued", "building", "ready", "failed"]
    progress: Progress | None
    error: str | None
    questions: int | None = Field(description="the shared questions it learned from (once ready)")
    report: dict[str, Any] | None = Field(description="what the build chose: the lean's block, the steering "
                                          "block and strength, and the chat gain of each strength tried on "
                                          "held-out questions (mean and standard error)")
    artifact: ArtifactRef | None
    sample_hash: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class PopulationList(Response):
    populations: list[PopulationOut]


class QuestionsQuery(Request):
    model_config = ConfigDict(extra="forbid", strict=False)
    k: int = Field(20, ge=1, le=500, description="how many questions")
    subject_kind: Literal["user", "group"] | None = Field(None, description="with subject_id: leave out the "
                                                                            "questions this subject answered")
    subject_id: str | None = Field(None, pattern=ID_PATTERN)


class SuggestedQuestion(Response):
    id: str = Field(description="the item id to answer it under")
    question: str
    options: list[str]
    ordinal: list[float]


class QuestionList(Response):
    population: str
    questions: list[SuggestedQuestion] = Field(description="most informative first: where the population's "
                                                           "groups are predicted to disagree most")
