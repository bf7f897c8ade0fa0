"""OpenAI-style chat messages for the fixture cases (make_fixtures.py, fixtures_qwen3vl.py),
and their mapping onto the list-of-parts shape Hugging Face chat templates expect. Media
URLs are paths relative to the fixture root."""


def image_part(name, **extra):
    """An image part; `extra`: fields of `image_url` besides the URL (`max_pixels`)."""
    return {"type": "image_url", "image_url": dict(url=f"images/{name}.png", **extra)}


def video_part(name, **sampling):
    return {"type": "video_url", "video_url": dict(url=f"videos/{name}.mp4", **sampling)}


def text_part(text):
    return {"type": "text", "text": text}


def user(*parts):
    return {"role": "user", "content": list(parts)}


def to_hf_messages(messages):
    """OpenAI content (string or parts) -> the list-of-parts shape HF chat templates expect."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [text_part(content)]
        kinds = {"image_url": {"type": "image"}, "video_url": {"type": "video"}}
        out.append({"role": m["role"], "content": [kinds.get(p["type"], p) for p in content]})
    return out
