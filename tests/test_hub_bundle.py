"""The saved folder is a self-contained Hub bundle: Auto classes, remote code without this package, pipeline."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import make_model, make_processor, photo
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

BUNDLE_FILES = {
    "configuration_llava_uhd.py",
    "modeling_llava_uhd.py",
    "image_processing_llava_uhd.py",
    "layout_llava_uhd.py",
    "processing_llava_uhd.py",
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    make_model().save_pretrained(folder)
    make_processor().save_pretrained(folder)
    return folder


def test_bundle_files_and_auto_map(bundle):
    assert BUNDLE_FILES <= {p.name for p in bundle.iterdir()}
    config = json.loads((bundle / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_llava_uhd.LlavaUhdForConditionalGeneration"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_llava_uhd.LlavaUhdForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_llava_uhd.LlavaUhdConfig"
    processor_config = json.loads((bundle / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_llava_uhd.LlavaUhdProcessor"
    assert "AutoImageProcessor" in processor_config["image_processor"]["auto_map"]
    # Bundle files import each other only relatively.
    for name in BUNDLE_FILES:
        imports = re.findall(r"^(?:from|import) (\S+)", (bundle / name).read_text(), flags=re.M)
        local = [module for module in imports if "llava_uhd" in module]
        assert all(module.startswith(".") for module in local), (name, local)


def test_auto_classes_in_process(bundle):
    assert type(AutoConfig.from_pretrained(bundle)).__name__ == "LlavaUhdConfig"
    for auto in (AutoModel, AutoModelForImageTextToText):
        assert type(auto.from_pretrained(bundle)).__name__ == "LlavaUhdForConditionalGeneration"
    assert type(AutoProcessor.from_pretrained(bundle)).__name__ == "LlavaUhdProcessor"


REMOTE_SCRIPT = """
import sys
sys.modules["modeling_llava_uhd"] = None  # this package must not be importable: only the bundle's code may run
try:
    import modeling_llava_uhd
    raise SystemExit("package was importable")
except ImportError:
    pass
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

folder, image_path = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)) is type(model)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image = Image.open(image_path)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits[0, -1]
torch.save(logits, folder + "/remote_logits.pt")
out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
assert out.shape[1] == inputs["input_ids"].shape[1] + 4

pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}]
answer = pipe(text=chat, max_new_tokens=4, min_new_tokens=4)
assert answer[0]["generated_text"][-1]["role"] == "assistant", answer
print("REMOTE OK")
"""


def test_remote_code_loads_without_the_package(bundle, tmp_path):
    image_path = tmp_path / "coffee.png"
    photo("coffee").save(image_path)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REMOTE_SCRIPT), str(bundle), str(image_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "REMOTE OK" in result.stdout, result.stderr[-3000:]

    # The remote-code model computes what the package computes.
    model = AutoModelForImageTextToText.from_pretrained(bundle).eval()
    processor = AutoProcessor.from_pretrained(bundle)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}],
        add_generation_prompt=True,
    )
    from PIL import Image

    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    with torch.no_grad():
        local = model(**inputs).logits[0, -1]
    torch.testing.assert_close(local, torch.load(bundle / "remote_logits.pt"))


def test_pipeline_in_process(bundle):
    """The pipeline answers what its model's own greedy `generate` answers on its processor's inputs."""
    pipe = pipeline("image-text-to-text", model=str(bundle))
    chat = [{"role": "user", "content": [{"type": "image", "image": photo("camera")}, {"type": "text", "text": "Hi"}]}]
    greedy = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    out = pipe(text=chat, generate_kwargs=greedy, return_full_text=False)
    model, processor = pipe.model, pipe.processor
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=photo("camera"), text=prompt, return_tensors="pt")
    generated = model.generate(**inputs, **greedy)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) == 3 and out[0]["generated_text"] == processor.decode(new_tokens, skip_special_tokens=True)
