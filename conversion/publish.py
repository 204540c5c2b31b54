"""Publish a converted LLaVA-UHD folder to the Hugging Face Hub.

    python -m conversion.publish FOLDER ORG/NAME [--private] [--dry-run]

The token comes from the environment (`HF_TOKEN`) or `huggingface-cli login`.
"""

import argparse
from pathlib import Path

REQUIRED = ("config.json", "modeling_llava_uhd.py", "configuration_llava_uhd.py", "processor_config.json", "README.md")


def check_folder(folder: Path) -> list[Path]:
    """The files to upload; refuses a folder that is not a complete converted model."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder.")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"{folder} is not a converted LLaVA-UHD folder; missing: {', '.join(missing)}.")
    return sorted(p for p in folder.iterdir() if p.is_file())


def publish(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False) -> str:
    """Create `repo_id` (if needed) and upload `folder`; with `dry_run`, only list what would be uploaded."""
    files = check_folder(Path(folder))
    if dry_run:
        lines = [f"Would upload {len(files)} files to {repo_id} ({'private' if private else 'public'}):"]
        lines += [f"  {p.name:40s} {p.stat().st_size:>14,d} bytes" for p in files]
        return "\n".join(lines)
    from huggingface_hub import create_repo, upload_folder

    url = create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload LLaVA-UHD (converted)")
    return f"Uploaded {len(files)} files to {url}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("repo_id", metavar="ORG/NAME")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    args = parser.parse_args(argv)
    try:
        print(publish(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run))
    except ValueError as error:
        print(f"publish failed: {error}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
