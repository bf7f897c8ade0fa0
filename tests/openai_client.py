"""The official `openai` Python package against a running Ocellus server, unchanged.

    python tests/openai_client.py BASE_URL MODEL IMAGE_PNG API_KEY PROMPT_TOKENS [VIDEO_MP4]

Run by tests/openai_client.rs, which starts the server; exits non-zero on any failure.
PROMPT_TOKENS: what the image question comes to for this model; VIDEO_MP4, when given, is
also asked about (vLLM's `video_url` part, which the client passes through).
"""

import base64
import json
import sys
from typing import Literal

import openai
from pydantic import BaseModel, Field

base_url, model, image_path, api_key, prompt_tokens = sys.argv[1:6]
video_path = sys.argv[6] if len(sys.argv) > 6 else None
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
image = "data:image/png;base64," + base64.b64encode(open(image_path, "rb").read()).decode()
messages = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": "What is in this picture?"},
        ],
    }
]

# Models
assert [m.id for m in client.models.list().data] == [model]

# Chat, one answer
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
answer = chat.choices[0].message.content
assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
assert answer, "empty answer"
assert chat.choices[0].finish_reason in ("stop", "length")
assert chat.usage.prompt_tokens == int(prompt_tokens), chat.usage
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

# Chat, streamed, with usage: the same greedy answer
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        finish = choice.finish_reason or finish
assert "".join(pieces) == answer, ("".join(pieces), answer)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
assert finish == chat.choices[0].finish_reason

# Logprobs
chat = client.chat.completions.create(
    model=model, messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
)
content = chat.choices[0].logprobs.content
assert len(content) == 3 and len(content[0].top_logprobs) == 2 and content[0].logprob <= 0

# A video, as a data URI
if video_path:
    video = "data:video/mp4;base64," + base64.b64encode(open(video_path, "rb").read()).decode()
    parts = [{"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": "What happens?"}]
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": parts}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.content and chat.usage.prompt_tokens > 20, chat

# Structured outputs: `parse` with a Pydantic model (the client sends its strict JSON
# schema); the answer parses and validates whatever the weights, streamed or not.
class Owner(BaseModel):
    id: int = Field(ge=1, le=999)
    active: bool


class Animal(BaseModel):
    name: str = Field(max_length=8)
    kind: Literal["cat", "dog", "bird"]
    legs: int = Field(ge=0, le=8)
    owner: Owner
    tags: list[Literal["small", "big"]] = Field(max_length=2)


parsed = client.chat.completions.parse(
    model=model, messages=messages, response_format=Animal, max_tokens=300, temperature=1, seed=3
)
assert isinstance(parsed.choices[0].message.parsed, Animal), parsed
schema = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=100,
    temperature=1,
    seed=5,
    stream=True,
    response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}},
)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
verdict = json.loads(text)
assert verdict["answer"] in ("yes", "no") and 0 <= verdict["confidence"] <= 9, verdict

# Tool calling: a required call, its result sent back, streamed and not
weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 3}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
question = [{"role": "user", "content": "What is the weather in Paris?"}]
called = client.chat.completions.create(
    model=model, messages=question, tools=[weather], tool_choice="required", max_tokens=120, temperature=1, seed=7
)
choice = called.choices[0]
assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, called
call = choice.message.tool_calls[0]
arguments = json.loads(call.function.arguments)
assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_"), call
assert arguments["city"] in ("Paris", "Oslo") and 1 <= arguments["days"] <= 3, arguments
# The usual loop: the assistant's message (the client's own object) and the tool's answer.
follow_up = question + [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
answered = client.chat.completions.create(model=model, messages=follow_up, tools=[weather], max_tokens=8, temperature=0)
assert answered.choices[0].message.role == "assistant" and answered.usage.prompt_tokens > called.usage.prompt_tokens
calls, finish = {}, None
for chunk in client.chat.completions.create(
    model=model, messages=question, tools=[weather], tool_choice="required", max_tokens=120, temperature=1, seed=7,
    stream=True,
):
    for piece in chunk.choices[0].delta.tool_calls or []:
        entry = calls.setdefault(piece.index, {"id": piece.id, "name": piece.function.name, "arguments": ""})
        entry["arguments"] += piece.function.arguments or ""
    finish = chunk.choices[0].finish_reason or finish
# The same seed: the same call as the whole answer's, in pieces.
assert finish == "tool_calls" and calls[0]["name"] == "get_weather", calls
assert [json.loads(c["arguments"]) for c in calls.values()] == [
    json.loads(c.function.arguments) for c in choice.message.tool_calls
], (calls, choice.message.tool_calls)
named = client.chat.completions.create(
    model=model, messages=question, tools=[weather], max_tokens=120, temperature=1, seed=8,
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
)
assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_weather"], named

# The Responses API (stateless): the chat's greedy answer, whole and streamed
question = [
    {
        "role": "user",
        "content": [
            {"type": "input_image", "image_url": image},
            {"type": "input_text", "text": "What is in this picture?"},
        ],
    }
]
response = client.responses.create(model=model, input=question, max_output_tokens=12, temperature=0, store=False)
assert response.object == "response" and response.output_text == answer, (response.output_text, answer)
assert response.usage.input_tokens == int(prompt_tokens), response.usage
assert response.status in ("completed", "incomplete"), response
events = list(
    client.responses.create(model=model, input=question, max_output_tokens=12, temperature=0, store=False, stream=True)
)
assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert deltas == answer and events[-1].response.output_text == answer, (deltas, answer)
answer_only = client.responses.create(model=model, input="Say hi.", instructions="Be brief.", max_output_tokens=4)
assert answer_only.usage.output_tokens <= 4 and answer_only.instructions == "Be brief.", answer_only
# text.format: structured outputs, the schema held whatever the weights
shaped = client.responses.create(
    model=model, input=question, max_output_tokens=100, temperature=1,
    text={"format": {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}},
    extra_body={"seed": 5},
)
verdict = json.loads(shaped.output_text)
assert verdict["answer"] in ("yes", "no") and 0 <= verdict["confidence"] <= 9, verdict
try:
    client.responses.create(model=model, input="Hi", previous_response_id="resp_1")
    raise AssertionError("previous_response_id was accepted")
except openai.BadRequestError as err:
    assert err.code == "unsupported_parameter" and err.param == "previous_response_id", err

# Completions
completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
assert completion.object == "text_completion" and completion.usage.completion_tokens == 5

# Errors arrive as the client's typed exceptions
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as err:
    assert err.status_code == 404 and err.code == "model_not_found", err
try:
    client.chat.completions.create(model=model, messages=messages, temperature=5)
    raise AssertionError("temperature 5 was accepted")
except openai.BadRequestError as err:
    assert err.status_code == 400 and err.param == "temperature", err
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong API key was accepted")
except openai.AuthenticationError as err:
    assert err.status_code == 401, err

print("openai", openai.__version__, "ok")
