"""The demo page (`llava-uhd demo`) through its API, with gradio_client on loopback: answers equal `model.generate`,
the slicing figures equal the processor's, every bad input comes back as a message and the next request is still
answered, a request beyond the queue is refused. Needs the demo extra (Gradio): `.ci/demo.sh` builds that
environment; skipped elsewhere, except the test of the message that names the missing extra."""

import contextlib
import dataclasses
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_cli_safety import bilevel_png
from tiny import gradient, make_model, make_processor, photo

from modeling_llava_uhd import LlavaUhdForConditionalGeneration, LlavaUhdProcessor, cli, default_model_path

ROOT = Path(__file__).resolve().parents[1]
DETAIL, QUESTION = ROOT / "examples" / "detail.png", "Which pattern is inside the frame?"
MAX_NEW_TOKENS = 24
needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason='needs pip install -e ".[demo]"')
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports, no version check
pytestmark = [  # Gradio's queue statistics on pandas 3
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated:Warning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(app):
    """A gradio_client `Client` of `app`, served on a free loopback port until the caller closes the app."""
    from gradio_client import Client

    app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    return Client(app.local_url, verbose=False)


def expected_answer(
    model, processor, image: Image.Image, turns: list[str], max_slice_nums: int = 7, **generate_kwargs
) -> tuple[str, int]:
    """`model.generate`'s answer after `turns` (questions and answers, alternating; the image in the first question),
    decoded as the page decodes it, and the prompt's length."""
    messages = [
        {"role": "user" if index % 2 == 0 else "assistant", "content": [{"type": "text", "text": text}]}
        for index, text in enumerate(turns)
    ]
    messages[0]["content"].insert(0, {"type": "image"})
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, max_slice_nums=max_slice_nums, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, **generate_kwargs)
    length = inputs["input_ids"].shape[1]
    return processor.decode(output[0, length:], skip_special_tokens=True).strip(), length


def texts(chat: list[dict]) -> list[str]:
    return [part["text"] for message in chat for part in message["content"] if part["type"] == "text"]


def ask(client, history: list, files: list, question: str, max_slice_nums=7, decoding="greedy", tokens=MAX_NEW_TOKENS):
    from gradio_client import handle_file

    files = [handle_file(str(path)) for path in files]
    return client.predict(history, files, question, max_slice_nums, decoding, tokens, api_name="/ask")


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    path = default_model_path(tmp_path_factory.mktemp("cache"))
    return LlavaUhdForConditionalGeneration.from_pretrained(path).eval(), LlavaUhdProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def client(default):
    from modeling_llava_uhd.demo import build_app, bundled_examples

    app = build_app(*default, bundled_examples())
    yield serve(app)
    app.close()


@needs_gradio
def test_each_example_answer_equals_generate(default, client):
    from modeling_llava_uhd.demo import bundled_examples

    model, processor = default
    assert [Path(path).name for path, _ in bundled_examples()] == ["detail.png", "coffee.jpg"]
    for path, question in bundled_examples():
        expected, length = expected_answer(model, processor, Image.open(path), [question], do_sample=False)
        chat, figures, box = ask(client, [], [path], question)
        assert texts(chat) == [question, expected]
        assert box == ""
        assert figures["prompt_tokens"] == length and figures["decoding"] == "greedy"
        assert figures["new_tokens"] >= 1 and figures["time_to_first_token_s"] > 0 and figures["tokens_per_s"] > 0
    assert texts(ask(client, [], [DETAIL], QUESTION)[0])[-1] == "checks"  # the README's answer


@needs_gradio
def test_later_turns_every_decoding_and_the_slider(default, client):
    model, processor = default
    image = Image.open(DETAIL)
    chat, _, _ = ask(client, [], [DETAIL], QUESTION)
    follow_up = "Describe the image in detail."
    expected, length = expected_answer(model, processor, image, [QUESTION, "checks", follow_up], do_sample=False)
    chat, figures, _ = ask(client, chat, [DETAIL], follow_up)
    assert texts(chat) == [QUESTION, "checks", follow_up, expected]
    assert figures["prompt_tokens"] == length

    beams, _ = expected_answer(model, processor, image, [QUESTION], do_sample=False, num_beams=4)
    chat, figures, _ = ask(client, [], [DETAIL], QUESTION, decoding="beam search")
    assert texts(chat)[-1] == beams and figures["decoding"] == "beam search"
    chat, figures, _ = ask(client, [], [DETAIL], QUESTION, decoding="sampling")
    assert len(texts(chat)) == 2 and figures["decoding"] == "sampling"

    # The slider's setting reaches the model: the overview alone.
    overview_only, length = expected_answer(model, processor, image, [QUESTION], max_slice_nums=1, do_sample=False)
    chat, figures, _ = ask(client, [], [DETAIL], QUESTION, max_slice_nums=1)
    assert texts(chat)[-1] == overview_only
    assert figures["crops"] == 1 and figures["prompt_tokens"] == length


@needs_gradio
def test_regenerate_and_clear(client):
    from gradio_client import handle_file

    chat, _, _ = ask(client, [], [DETAIL], QUESTION)
    again, figures, _ = client.predict(
        chat, [handle_file(str(DETAIL))], 7, "greedy", MAX_NEW_TOKENS, api_name="/regenerate"
    )
    assert texts(again) == [QUESTION, "checks"] and figures["decoding"] == "greedy"
    assert client.predict(api_name="/clear") == ([], None, "")


@needs_gradio
def test_answers_stream_token_by_token(tmp_path):
    """A tiny random model (it does not stop early): the page shows the answer growing, then the exact decode."""
    from gradio_client import handle_file

    from modeling_llava_uhd.demo import build_app

    model, processor = make_model("resampler", seed=3), make_processor()
    image = gradient(500, 300)
    image.save(tmp_path / "gradient.png")
    expected, _ = expected_answer(model, processor, image, ["What is in the picture?"], do_sample=False)
    app = build_app(model, processor)
    try:
        job = serve(app).submit(
            [], [handle_file(str(tmp_path / "gradient.png"))], "What is in the picture?", 7, "greedy", MAX_NEW_TOKENS,
            api_name="/ask",
        )  # fmt: skip
        final = job.result(timeout=120)
        partials = [texts(chat)[-1] for chat, _, _ in job.outputs()[:-1] if len(chat) == 2]
    finally:
        app.close()
    assert texts(final[0])[-1] == expected
    assert len(partials) >= MAX_NEW_TOKENS // 2, partials
    assert all(expected.startswith(partial.strip()) for partial in partials), (partials, expected)


@needs_gradio
def test_a_cancelled_request_stops_its_generate(tmp_path):
    """A request cancelled mid-stream (its page closed) stops its generate, so the next one does not share the CPU."""
    from gradio_client import handle_file

    from modeling_llava_uhd.demo import build_app

    model, processor = make_model("resampler", seed=3), make_processor()
    generate, new_tokens = model.generate, []

    def counted(**kwargs):
        output = generate(**kwargs)
        new_tokens.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    model.generate = counted
    gradient(500, 300).save(tmp_path / "gradient.png")
    app = build_app(model, processor)
    try:
        job = serve(app).submit(
            [], [handle_file(str(tmp_path / "gradient.png"))], "What is in the picture?", 7, "greedy", 1024,
            api_name="/ask",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while len(job.outputs()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        job.cancel()
        while not new_tokens and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        app.close()
    assert new_tokens and new_tokens[0] < 100, new_tokens


def exif_rotated(path: Path) -> Path:
    """A 600 x 400 (W x H) photo stored sideways, 400 x 600, with EXIF orientation 6 (turn it back to show it)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo("coffee").transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    return path


@needs_gradio
def test_slicing_figures_equal_the_processor(default, client, tmp_path):
    from gradio_client import handle_file

    _, processor = default
    images = {"detail.png": Image.open(DETAIL), "coffee.jpg": Image.open(ROOT / "examples" / "coffee.jpg")}
    for width, height in ((120, 90), (2000, 400), (420, 2100), (1500, 1100)):
        images[f"{width}x{height}.png"] = gradient(width, height)
    for name, image in images.items():
        image.save(tmp_path / name)
    upright = {**images, "rotated.jpg": Image.new("RGB", (600, 400))}  # sliced upright
    exif_rotated(tmp_path / "rotated.jpg")
    for name, image in upright.items():
        for max_slice_nums in (1, 3, 7, 14):
            overlay, overview, summary, figures = client.predict(
                [handle_file(str(tmp_path / name))], max_slice_nums, api_name="/preview"
            )
            layout = processor.image_processor.get_slice_layout(image.height, image.width, max_slice_nums)
            sizes = [[image.height, image.width]]
            tokens = processor._get_num_multimodal_tokens(sizes, max_slice_nums=max_slice_nums)["num_image_tokens"]
            assert {key: figures[key] for key in ("image_size", "overview_size", "grid", "slice_size")} == {
                key: list(value) if value else value for key, value in dataclasses.asdict(layout).items()
            }, (name, max_slice_nums)
            assert figures["tokens"] == tokens[0] == figures["image_tokens"] + figures["separators"]
            assert figures["crops"] == layout.num_crops and figures["llava_1_5_tokens"] == 576
            assert summary.startswith(f"### {tokens[0]} tokens\n")
            height, width = layout.image_size
            assert Image.open(overlay).size == (width, height)  # the sliced size (at most 1024 a side here)
            assert Image.open(overview).size == layout.overview_size[::-1]
    assert client.predict([], 7, api_name="/preview")[2] == "Upload an image to see its slices."


@needs_gradio
def test_bad_inputs_come_back_as_messages_and_the_next_request_is_answered(client, tmp_path):
    """Each case is refused with a message that says what is wrong; the page then answers the README's question."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "text.png").write_text("a text file named like an image")
    (tmp_path / "truncated.png").write_bytes(DETAIL.read_bytes()[:10_000])
    corrupt = bytearray(DETAIL.read_bytes())
    corrupt[100:400] = bytes(300)  # the image data's first bytes zeroed: its checksum fails
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    bilevel_png(tmp_path / "bomb.png", 20_000, 20_000)
    bad_files = {
        "notes.txt": "Invalid file type",
        "text.png": "'text.png' is not an image file Pillow can read",
        "truncated.png": "'truncated.png' could not be decoded (corrupt or truncated)",
        "corrupt.png": "'corrupt.png' could not be decoded",
        "bomb.png": "'bomb.png' has 400,000,000 pixels, over Pillow's limit",
    }
    for name, message in bad_files.items():
        with pytest.raises(AppError, match=re.escape(message)):
            ask(client, [], [tmp_path / name], QUESTION)
        if name != "notes.txt":  # Gradio's own check refuses that one before the page's code sees it
            _, _, summary, figures = client.predict([handle_file(str(tmp_path / name))], 7, api_name="/preview")
            assert "**Not a usable image.**" in summary and message in summary and figures is None
        assert texts(ask(client, [], [DETAIL], QUESTION)[0])[-1] == "checks"

    two_images = [DETAIL, ROOT / "examples" / "coffee.jpg"]
    requests = {
        "The question is empty": ([DETAIL], "   ", {}),
        "Upload an image": ([], QUESTION, {}),
        r"One image per conversation: 2 files were uploaded \(detail.png, coffee.jpg\)": (two_images, QUESTION, {}),
        "contains the image token '&lt;image&gt;'": ([DETAIL], "What is <image>?", {}),
        "with 1024 new ones it passes this model's 1024 positions": ([DETAIL], QUESTION, {"tokens": 1024}),
        "'telepathy' .* is not in the list of choices": ([DETAIL], QUESTION, {"decoding": "telepathy"}),  # Gradio's
    }
    for message, (files, question, options) in requests.items():
        with pytest.raises(AppError, match=message):
            ask(client, [], files, question, **options)
        assert texts(ask(client, [], [DETAIL], QUESTION)[0])[-1] == "checks"
    _, _, summary, _ = client.predict([handle_file(str(path)) for path in two_images], 7, api_name="/preview")
    assert "**Several images.**" in summary
    with pytest.raises(AppError, match="Nothing to regenerate yet"):
        client.predict([], [handle_file(str(DETAIL))], 7, "greedy", 8, api_name="/regenerate")
    assert texts(ask(client, [], [DETAIL], QUESTION)[0])[-1] == "checks"


class Held:
    """A model whose `generate` waits until `release` is set (and says when it started waiting)."""

    def __init__(self, model):
        self.model, self.started, self.release = model, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, **kwargs):
        self.started.set()
        self.release.wait(120)
        return self.model.generate(**kwargs)


@needs_gradio
def test_one_generate_at_a_time_on_cpu_and_a_full_queue_refuses(default):
    from gradio_client import handle_file
    from gradio_client.utils import QueueError, Status

    from modeling_llava_uhd.demo import build_app

    model = Held(default[0])
    app = build_app(model, default[1], max_queue=1)
    try:
        client = serve(app)
        request = ([], [handle_file(str(DETAIL))], QUESTION, 7, "greedy", MAX_NEW_TOKENS)
        running = client.submit(*request, api_name="/ask")
        assert model.started.wait(60)
        waiting = client.submit(*request, api_name="/ask")  # the CPU's one slot is taken: it waits in the queue
        deadline = time.monotonic() + 60
        while waiting.status().code != Status.IN_QUEUE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting.status().code == Status.IN_QUEUE
        with pytest.raises(QueueError, match="Queue is full! Please try again."):
            client.submit(*request, api_name="/ask").result(timeout=60)
        model.release.set()
        for job in (running, waiting):
            assert texts(job.result(timeout=60)[0])[-1] == "checks"
    finally:
        model.release.set()
        app.close()


def test_demo_without_gradio_names_the_install_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` fails as where it is not installed
    monkeypatch.delitem(sys.modules, "modeling_llava_uhd.demo", raising=False)
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err == (
        'llava-uhd demo: error: the demo needs Gradio, which the demo extra installs: pip install -e ".[demo]" from a '
        'checkout (or pip install "llava-uhd[demo]")\n'
    )


def test_demo_options_are_checked(capsys):
    for port in ("0", "70000", "http"):
        assert cli.main(["demo", "--port", port]) == 2
        assert "--port: expected" in capsys.readouterr().err


@needs_gradio
def test_demo_refuses_a_model_with_its_own_code_without_trust(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "other", "auto_map": {"AutoModel": "x.Y"}}')
    assert cli.main(["demo", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is not a LLaVA-UHD model" in err and "pass --trust-remote-code" in err and len(err.splitlines()) == 1


@contextlib.contextmanager
def server_process(command: list[str], port: int, tmp_path: Path, cwd: Path = ROOT, **env: str):
    """Run `command` (a server on `port`) offline; yield a gradio_client `Client` of it and a list that gets the
    process's output once it has been interrupted."""
    from gradio_client import Client

    env = os.environ | {"HF_HUB_OFFLINE": "1", "LLAVA_UHD_CACHE": str(tmp_path / "cache")} | env
    server = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        deadline, client = time.monotonic() + 180, None
        while client is None and server.poll() is None and time.monotonic() < deadline:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # not listening yet
                time.sleep(0.5)
        assert client is not None, server.communicate(timeout=30)[0] if server.poll() is not None else "no server"
        yield client, output
    finally:
        server.send_signal(signal.SIGINT)
        output.append(server.communicate(timeout=60)[0])


@needs_gradio
def test_demo_command_serves_the_default_model_on_loopback(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "modeling_llava_uhd.cli", "demo", "--port", str(port)]
    with server_process(command, port, tmp_path) as (client, output):
        assert texts(ask(client, [], [DETAIL], QUESTION)[0])[-1] == "checks"
        sockets = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        listening = {fields[1] for fields in sockets if fields[3] == "0A"}
        assert f"0100007F:{port:04X}" in listening and f"00000000:{port:04X}" not in listening  # 127.0.0.1 only
    assert f"http://127.0.0.1:{port}" in output[0]


@needs_gradio
def test_space_app_serves_the_model_its_variable_names(default, tmp_path):
    """examples/space/app.py as a Space runs it: from the Space's folder (the app, its example images), on the address
    and port Gradio's variables give, the model named by MODEL."""
    space = tmp_path / "space"
    space.mkdir()
    for path in (ROOT / "examples" / "space" / "app.py", DETAIL, ROOT / "examples" / "coffee.jpg"):
        shutil.copy(path, space)
    model = tmp_path / "model"
    default[0].save_pretrained(model)
    default[1].save_pretrained(model)
    port = free_port()
    variables = {"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "MODEL": str(model)}
    with server_process([sys.executable, "app.py"], port, tmp_path, cwd=space, **variables) as (client, _):
        assert texts(ask(client, [], [DETAIL], QUESTION)[0])[-1] == "checks"
        examples = [example for example in client.config["dependencies"] if example.get("api_name") == "load_example"]
        assert examples, client.config["dependencies"]
