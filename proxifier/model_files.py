"""Model files named by a Hugging Face repository instead of a path: which file, where each node
keeps its copy, and how far a download has come. No Ray; the network only through
huggingface_hub in `fetch`. The fetching itself is huggingface_hub's
(`hf_hub_download`: resumable, locked against a second download of the same file, verified);
this module only chooses what to ask it for and reports its progress."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxifier.home import proxifier_home

# owner/name, optionally :TAG (a quantisation such as Q4_K_M, as llama.cpp's own -hf takes it)
HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")
# what llama.cpp's -hf picks when a repository holds several quantisations and none is named
DEFAULT_QUANT = "Q4_K_M"
# one part of a split GGUF: `name-00002-of-00003.gguf`
PART = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


@dataclass(frozen=True)
class HfSource:
    repo: str
    file: str | None  # None: chosen from the repository's files by `tag`
    tag: str | None
    revision: str | None = None

    @property
    def label(self) -> str:
        return f"{self.repo}/{self.file}" if self.file else f"{self.repo}:{self.tag or ''}"


def hf_source(hf_repo: str | None, hf_file: str | None) -> HfSource | None:
    """The repository and file (or quantisation tag) a model's config names, or None."""
    if not hf_repo:
        return None
    repo, _, tag = hf_repo.partition(":")
    return HfSource(repo=repo, file=hf_file, tag=tag or None)


def choose_gguf(files: list[str], tag: str | None, repo: str) -> str:
    """The .gguf file of a repository listing that a tag (or the default) means. Split files
    (`-00001-of-00003.gguf`) are named by their first part; multimodal projectors are never
    the model. A clear error names what the repository has."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower())
    firsts = [f for f in ggufs if split_parts(f)[0] == f]  # whole files, and first parts
    if not firsts:
        raise FileNotFoundError(f"the Hugging Face repository {repo!r} has no .gguf file")
    if tag is None and len(firsts) == 1:
        return firsts[0]
    wanted = (tag or DEFAULT_QUANT).lower()
    # The tag must stand alone in the name (Q4_K would otherwise match Q4_K_M).
    pattern = re.compile(rf"(^|[^a-z0-9]){re.escape(wanted)}([^a-z0-9_]|$)")
    matches = [f for f in firsts if pattern.search(Path(f).name.lower())]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(firsts[:20])
    if not matches:
        what = f"no file for the tag {tag!r}" if tag else "several files and no tag"
        raise FileNotFoundError(
            f"the Hugging Face repository {repo!r} has {what}; set hf_file or a tag "
            f"(hf_repo: {repo}:TAG). Its .gguf files: {names}"
        )
    raise FileNotFoundError(
        f"the tag {wanted!r} matches several files of {repo!r}: {', '.join(matches)}; set hf_file"
    )


def model_cache(configured: str | None) -> Path:
    """The node-local folder downloads go to: the configured one, `~` and $VARIABLES expanded
    on the node itself, else ~/.cache/proxifier/models ($PROXIFIER_HOME/models)."""
    if configured:
        return Path(os.path.expanduser(os.path.expandvars(configured)))
    return proxifier_home() / "models"


def cached_file(source: HfSource, cache: Path) -> Path | None:
    """The file, when this node already has it (no network: a node that cannot reach the Hub
    still starts a model it has fetched before)."""
    if source.file is None:
        return _cached_for_tag(source, cache) if source.tag else None
    from huggingface_hub import try_to_load_from_cache

    found = [
        try_to_load_from_cache(source.repo, part, cache_dir=cache, revision=source.revision)
        for part in split_parts(source.file)
    ]
    if not all(isinstance(path, str) for path in found):
        return None  # not here, or a split model with a part missing
    return Path(str(found[0]))


def _cached_for_tag(source: HfSource, cache: Path) -> Path | None:
    """The file a tag names among this node's copies of the repository's revision: the
    Hugging Face cache layout (refs/<revision> names the snapshot), read without a scan of the
    whole cache, since the controller asks this on status calls."""
    from huggingface_hub.file_download import repo_folder_name

    folder = cache / repo_folder_name(repo_id=source.repo, repo_type="model")
    try:
        commit = (folder / "refs" / (source.revision or "main")).read_text().strip()
    except OSError:
        return None
    snapshot = folder / "snapshots" / commit
    files = {p.relative_to(snapshot).as_posix(): p for p in snapshot.rglob("*") if p.is_file()}
    try:
        first = choose_gguf(list(files), source.tag, source.repo)
    except FileNotFoundError:
        return None
    return files[first] if all(part in files for part in split_parts(first)) else None


def hub_options(env: dict[str, str]) -> dict[str, Any]:
    """Token and endpoint from the model's own `env` (a private repository's HF_TOKEN, a
    mirror's HF_ENDPOINT); else huggingface_hub's defaults on the node."""
    options: dict[str, Any] = {}
    if env.get("HF_TOKEN"):
        options["token"] = env["HF_TOKEN"]
    if env.get("HF_ENDPOINT"):
        options["endpoint"] = env["HF_ENDPOINT"].rstrip("/")
    return options


Progress = Callable[[int, int | None], None]


def fetch(source: HfSource, cache: Path, env: dict[str, str], progress: Progress) -> Path:
    """Download the model file into `cache` (blocking: run it in a thread) and return its
    path; `progress(done, total)` as bytes arrive. A split model comes with all its parts,
    into the same snapshot folder (llama-server finds them beside the first). Raises
    huggingface_hub's errors, whose messages are the Hub's own."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from tqdm.auto import tqdm

    options = hub_options(env)
    file = source.file
    if file is None:
        info = HfApi(endpoint=options.get("endpoint"), token=options.get("token")).model_info(
            source.repo, revision=source.revision
        )
        file = choose_gguf([s.rfilename for s in info.siblings or []], source.tag, source.repo)
    parts = split_parts(file)
    sizes = [0] * len(parts)
    if len(parts) > 1:  # the whole size first, so the progress counts to the end
        for i, part in enumerate(parts):
            url = hf_hub_url(
                source.repo, part, revision=source.revision, endpoint=options.get("endpoint")
            )
            meta = get_hf_file_metadata(url, token=options.get("token"))
            sizes[i] = meta.size or 0
    done_before = 0  # bytes of the parts already fetched

    class Reporter(tqdm):  # type: ignore[misc]
        """huggingface_hub's progress bar, told to report instead of draw."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True  # no bar in the actor's log
            super().__init__(*args, **kwargs)
            self.report()

        def update(self, n: float | None = 1) -> bool | None:
            self.n += n or 0  # a disabled tqdm would not count
            self.report()
            return None

        def report(self) -> None:
            total = sum(sizes) if len(parts) > 1 else self.total
            progress(done_before + int(self.n or 0), total)

    paths = []
    for part, size in zip(parts, sizes, strict=True):
        path = hf_hub_download(
            source.repo,
            part,
            revision=source.revision,
            cache_dir=cache,
            tqdm_class=Reporter,
            **options,
        )
        paths.append(Path(path))
        done_before += size
    return paths[0]


def split_parts(file: str) -> list[str]:
    """Every part of the split GGUF a part belongs to (`x-00002-of-00003.gguf`), in order;
    any other file alone."""
    match = PART.match(file)
    if match is None:
        return [file]
    count = int(match["count"])
    return [f"{match['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def hub_message(error: BaseException) -> str:
    """What went wrong, in huggingface_hub's words and the Hub's own (its X-Error-Message),
    without the generic advice and request ids around them."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    message = lines[0].rstrip(".")
    if len(lines) > 1 and not lines[1].startswith("Please"):
        message = f"{message}: {lines[1]}"
    server = getattr(error, "server_message", None)
    if server and server not in message:
        message = f"{message} (the Hub says: {server.strip()})"
    return message


def unit_for(size: float) -> tuple[str, int]:
    """The largest binary unit there is at least one of in `size` (KiB at the least)."""
    return next(((unit, scale) for unit, scale in UNITS if size >= scale), UNITS[-1])


def describe_progress(done: int, total: int | None) -> str:
    """'downloading 1.2/4.7 GiB' in the unit the total needs."""
    unit, scale = unit_for(total or done)
    shown = f"{done / scale:.1f}"
    if total:
        return f"downloading {shown}/{total / scale:.1f} {unit}"
    return f"downloading {shown} {unit}"
