#!/usr/bin/env python3
"""Records how transformers renders conversations with tools, tool calls and tool answers
through Qwen3-VL's chat template (tests/fixtures/models/tiny-qwen3vl holds the hub's
template), for tests/tools.rs: Ocellus must give the same prompt, token for token.

  python scripts/fixtures_tools.py    # writes tests/fixtures/reference/tool-prompts.json

Each case keeps its messages in OpenAI's wire form (what a client sends: arguments as JSON
strings, content null beside calls); they are handed to transformers as vLLM hands them
(arguments parsed into objects, null content as ""). Needs transformers only (no torch);
`make_fixtures.py tiny` runs it too.
"""

import copy
import json
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "models" / "tiny-qwen3vl"
OUT = ROOT / "tests" / "fixtures" / "reference" / "tool-prompts.json"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city, in °C",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}


def call(id_, name, arguments):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


CASES = {
    "offer": {
        "tools": [WEATHER, NOW],
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the weather in Paris?"},
        ],
    },
    "round_trip": {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Paris and Zürich, please."}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call("call_1", "get_weather", {"city": "Paris"}),
                    call("call_2", "get_weather", {"city": "Zürich", "days": 2}),
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 °C, sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "9 °C, rain"}]},
        ],
    },
    "content_and_call": {
        "tools": [NOW],
        "messages": [
            {"role": "user", "content": "What time is it?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [call("call_9", "now", {})]},
            {"role": "tool", "tool_call_id": "call_9", "content": "12:00"},
            {"role": "assistant", "content": "It is noon."},
            {"role": "user", "content": "Thanks"},
        ],
    },
}


def as_vllm_gives_templates(messages):
    out = copy.deepcopy(messages)
    for message in out:
        if message.get("content") is None:
            message["content"] = ""
        for tool_call in message.get("tool_calls", []):
            tool_call["function"]["arguments"] = json.loads(tool_call["function"]["arguments"])
    return out


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    template = json.loads((MODEL / "chat_template.json").read_text())["chat_template"]
    cases = {}
    for name, case in CASES.items():
        prompt = tokenizer.apply_chat_template(
            as_vllm_gives_templates(case["messages"]),
            tools=case["tools"],
            chat_template=template,
            add_generation_prompt=True,
            tokenize=False,
        )
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        cases[name] = dict(case, prompt=prompt, input_ids=ids)
        print(f"  {name}: {len(ids)} tokens")
    OUT.write_text(json.dumps({"cases": cases}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
