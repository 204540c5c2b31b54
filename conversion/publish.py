"""Publish a converted LLaVA-UHD folder to the Hugging Face Hub.

    python -m conversion.publish FOLDER ORG/NAME [--public] [--dry-run]

Only the files the conversion wrote (its manifest lists them) are uploaded, once each is there as the conversion wrote
it (size and sha256) and the weights open; anything else in the folder stays local. The repo is created private
unless `--public`; an existing repo keeps its visibility. The token comes from the environment (`HF_TOKEN`) or `huggingface-cli login`.
"""

import argparse
from pathlib import Path

from huggingface_hub.utils import validate_repo_id

from .common import OneLineParser, reported
from .output import converted_files


def publish(folder: str | Path, repo_id: str, public: bool = False, dry_run: bool = False) -> str:
    """Create `repo_id` (private unless `public`) if needed and upload the converted files of `folder`; with
    `dry_run`, only list what would be uploaded."""
    validate_repo_id(repo_id)
    folder = Path(folder)
    names = converted_files(folder)
    visibility = "public" if public else "private"
    if dry_run:
        lines = [f"Would upload {len(names)} files to {repo_id} ({visibility} if created):"]
        lines += [f"  {name:40s} {(folder / name).stat().st_size:>14,d} bytes" for name in names]
        return "\n".join(lines)
    from huggingface_hub import CommitOperationAdd, create_commit, create_repo

    url = create_repo(repo_id, private=not public, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in names]
    create_commit(repo_id, operations, commit_message="Upload LLaVA-UHD (converted)")
    return f"Uploaded {len(names)} files to {url}"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m conversion.publish", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("repo_id", metavar="ORG/NAME")
    parser.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    parser.add_argument("--dry-run", action="store_true", help="check the folder and list what would be uploaded")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = parser.parse_args(argv)
    report = reported("publish failed", lambda: publish(args.folder, args.repo_id, public=args.public, dry_run=args.dry_run),
                      args.debug)  # fmt: skip
    if report is None:
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
