"""`llava-uhd` command line: inspect how an image is sliced, or chat with a model about an image."""

import argparse
import sys

from PIL import Image, ImageDraw

from .image_processing_llava_uhd import LlavaUhdImageProcessor, SliceLayout


def _max_image_size(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def image_token_cost(layout: SliceLayout, num_queries: int) -> tuple[int, int]:
    """(image tokens, separator tokens) an image with `layout` occupies in the LLM sequence."""
    return layout.num_crops * num_queries, layout.num_slices


def draw_slices(image: Image.Image, layout: SliceLayout) -> Image.Image:
    """`image` at its sliced size with the slice grid drawn on it."""
    height, width = layout.image_size
    canvas = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    if layout.grid is not None:
        rows, cols = layout.grid
        draw = ImageDraw.Draw(canvas)
        line = max(2, min(width, height) // 150)
        for col in range(1, cols):
            x = round(col * width / cols)
            draw.line([(x, 0), (x, height)], fill=(255, 40, 40), width=line)
        for row in range(1, rows):
            y = round(row * height / rows)
            draw.line([(0, y), (width, y)], fill=(255, 40, 40), width=line)
    return canvas


def slices(args: argparse.Namespace) -> None:
    processor = LlavaUhdImageProcessor(max_image_size=args.max_image_size)
    with Image.open(args.image) as image:
        image.load()
        layout = processor.get_slice_layout(image.height, image.width, args.max_slices)
        image_tokens, separators = image_token_cost(layout, args.num_queries)
        print(f"image:     {args.image} ({image.width}x{image.height}, W x H)")
        print(f"sliced at: {layout.image_size[1]}x{layout.image_size[0]}")
        if layout.grid is None:
            print("grid:      not sliced (overview only)")
        else:
            rows, cols = layout.grid
            print(f"grid:      {rows} row(s) x {cols} column(s) = {layout.num_slices} slices")
            print(f"slice:     {layout.slice_size[1]}x{layout.slice_size[0]}")
        print(f"overview:  {layout.overview_size[1]}x{layout.overview_size[0]}")
        print(f"tokens:    {image_tokens} image + {separators} separator = {image_tokens + separators} "
              f"({layout.num_crops} crops x {args.num_queries} queries)")
        if args.out:
            draw_slices(image, layout).save(args.out)
            print(f"drawn:     {args.out}")


def chat(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .default_model import default_model_path

    path = default_model_path() if args.model is None else args.model
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    model = model.to(args.device).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(args.image) as image:
        inputs = processor(images=image.convert("RGB"), text=prompt, return_tensors="pt").to(args.device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-uhd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    slice_parser = commands.add_parser("slices", help="print (and draw) how an image is sliced")
    slice_parser.add_argument("image", help="image file")
    slice_parser.add_argument("--max-slices", type=int, default=None, help="most slices (default 7)")
    slice_parser.add_argument(
        "--max-image-size", type=_max_image_size, default=1024, help="long-side pre-resize, or 'none' (default 1024)"
    )
    slice_parser.add_argument("--num-queries", type=int, default=144, help="tokens per crop (default 144)")
    slice_parser.add_argument("--out", help="write the image with the slice grid drawn on it to this PNG")
    slice_parser.set_defaults(func=slices)

    chat_parser = commands.add_parser("chat", help="answer a question about an image")
    chat_parser.add_argument(
        "--model", help="model folder or Hub repo id (default: the bundled default model, see README)"
    )
    chat_parser.add_argument("--image", required=True, help="image file")
    chat_parser.add_argument("--prompt", required=True, help="question about the image")
    chat_parser.add_argument("--max-new-tokens", type=int, default=128)
    chat_parser.add_argument("--device", default="cpu")
    chat_parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    chat_parser.set_defaults(func=chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (OSError, ValueError) as error:
        print(f"llava-uhd {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
