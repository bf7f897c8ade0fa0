"""The official `openai` Python package's `embeddings.create` against a running Ocellus
server with a contrastive model, unchanged.

    python tests/openai_embeddings.py BASE_URL MODEL API_KEY TEXT...

Run by tests/embeddings_server.rs; prints the vectors of the texts (the client's default,
base64, which it decodes) then of the first text again as floats, as one JSON list.
"""

import json
import sys

import openai

base_url, model, api_key, *texts = sys.argv[1:]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)

batch = client.embeddings.create(model=model, input=texts)
assert batch.object == "list" and batch.model == model, batch
assert [d.index for d in batch.data] == list(range(len(texts)))
assert all(d.object == "embedding" for d in batch.data)
assert batch.usage.prompt_tokens > 0 and batch.usage.total_tokens == batch.usage.prompt_tokens

single = client.embeddings.create(model=model, input=texts[0], encoding_format="float")
assert len(single.data) == 1

try:
    client.embeddings.create(model=model, input=[])
    raise SystemExit("an empty input was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["code"] == "invalid_value", e.body

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("a chat request to an embedding model was accepted")
except openai.BadRequestError as e:
    assert e.body["code"] == "unsupported_task", e.body

print(json.dumps([d.embedding for d in batch.data] + [single.data[0].embedding]))
