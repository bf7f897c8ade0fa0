#!/usr/bin/env python3
"""Records what TRL's DPOTrainer logs over 20 steps on the tiny SmolVLM fixture, for
tests/dpo.rs: Ocellus's `finetune --method dpo` must log the same loss, rewards and reward
accuracy at every step (LoRA from the same initial adapter, and every weight).

  python scripts/fixtures_dpo.py   # writes tests/fixtures/finetune/dpo/ and
                                   # tests/fixtures/reference/tiny-idefics3-dpo.json

The preference set: four images of the colours set, "What colour is this?", chosen the
image's colour, rejected the next colour. One step sees all four pairs (batch 4), so the
data order (TRL's sampler shuffles, Ocellus's too, differently) does not matter.
Needs scripts/requirements.txt and trl.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
import trl
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, Idefics3ForConditionalGeneration
from trl import DPOConfig, DPOTrainer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "models" / "tiny-idefics3"
COLOURS = FIXTURES / "finetune" / "colours"
OUT = FIXTURES / "finetune" / "dpo"
REFERENCE = FIXTURES / "reference" / "tiny-idefics3-dpo.json"
TEXT_LINEAR = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
STEPS = 20
RUNS = {
    # name: (learning rate, LoRA or not, the SFT term's weight: TRL's loss_type
    # ["sigmoid", "sft"] with loss_weights [1, w]; 0: sigmoid alone)
    "lora": (2e-3, True, 0.0),
    "full": (1e-4, False, 0.0),
    "lora-sft": (2e-3, True, 0.5),
}
LOGGED = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]


def pairs():
    """The first four conversations of the colours set as pairs, in Ocellus's JSONL and in
    TRL's conversational preference columns."""
    lines = [json.loads(l) for l in (COLOURS / "train.jsonl").read_text().splitlines()[:4]]
    names = sorted({l["messages"][1]["content"] for l in (json.loads(x) for x in (COLOURS / "train.jsonl").read_text().splitlines())})
    ours, theirs = [], []
    for line in lines:
        question, answer = line["messages"][0], line["messages"][1]["content"]
        rejected = names[(names.index(answer) + 1) % len(names)]
        url = question["content"][0]["image_url"]["url"]
        prompt = json.loads(json.dumps(question))
        prompt["content"][0]["image_url"]["url"] = f"../colours/{url}"
        ours.append({"prompt": [prompt], "chosen": answer, "rejected": rejected})
        text = question["content"][1]["text"]
        theirs.append({
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
            "images": [Image.open(COLOURS / url).convert("RGB")],
        })
    return ours, theirs


def run(name, lr, lora, sft, dataset, processor):
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32)
    if lora:
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TEXT_LINEAR)
        model = get_peft_model(model, config)
        init = OUT / "init-lora"
        shutil.rmtree(init, ignore_errors=True)
        model.save_pretrained(init)
        (init / "README.md").unlink(missing_ok=True)
        adapter_config = json.loads((init / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = MODEL.name
        (init / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    else:
        # Ocellus trains the text model, connector and vision encoder; the embeddings too.
        for p in model.parameters():
            p.requires_grad_(True)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=STEPS,
            learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", beta=0.1,
            loss_type=["sigmoid", "sft"] if sft else ["sigmoid"], loss_weights=[1.0, sft] if sft else None, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
            max_length=None, dataloader_num_workers=0, bf16=False,  # TRL defaults to bf16 autocast
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
        trainer.train()
    if name == "lora":
        # The trained adapter, for tests/dpo.rs to hold Ocellus's to it tensor by tensor.
        trained = OUT / "trl-lora"
        shutil.rmtree(trained, ignore_errors=True)
        trainer.model.save_pretrained(trained)
        (trained / "README.md").unlink(missing_ok=True)
        (trained / "adapter_config.json").unlink()
        shutil.rmtree(trained / "ref", ignore_errors=True)  # TRL's copy of the initial adapter
    steps = [{k: log[k] for k in LOGGED} for log in trainer.state.log_history if "rewards/chosen" in log]
    assert len(steps) == STEPS, steps
    print(f"  {name}: loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}")
    return {"lr": lr, "weights": "lora" if lora else "full", "sft_weight": sft, "steps": steps}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    ours, theirs = pairs()
    (OUT / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in ours))
    processor = AutoProcessor.from_pretrained(MODEL)
    processor.image_processor = AutoImageProcessor.from_pretrained(MODEL, backend="pil")
    dataset = Dataset.from_list(theirs)
    runs = {name: run(name, lr, lora, sft, dataset, processor) for name, (lr, lora, sft) in RUNS.items()}
    meta = {"trl": trl.__version__, "torch": torch.__version__, "batch_size": 4, "beta": 0.1}
    REFERENCE.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
