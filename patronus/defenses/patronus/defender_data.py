"""Which of the defender's images each half reads, and the check, before any work, that there are enough.

Real models read image folders (`metadata.jsonl`, one line per image) by position. The decoder
half's feature bank takes the first images of the bank's folders (unsafe: train, query, probe;
benign: train, probe) and the first prompts of its prompt files. The UNet half reads its own
folders (`unet.unsafe_dir`, `unet.benign_dir`) from the first image, or else the bank's folders
from the image after the decoder half's last, whichever parts a run protects: the halves never
share an image, and the UNet half reads the same images with or without the decoder half. The
glyph world renders every partition at an offset of its own (`bank.PART_START`,
`align.UNET_OFFSET`) and reads no folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patronus.defenses.patronus.bank import KIND_PARTS, FeatureBankConfig
from patronus.defenses.patronus.config import ProtectConfig, UNetAlignConfig
from patronus.errors import ConfigError
from patronus.evaluation.suites import load_prompt_file


@dataclass(frozen=True)
class Block:
    """Consecutive entries of one folder or prompt file that one half reads."""

    source: str
    kind: str  # unsafe | benign
    what: str  # images (a folder) | prompts (a prompt file)
    start: int
    sizes: dict[str, int]  # entries per partition, in the order they lie
    reader: str  # who reads them (for the error message)
    settings: str  # the settings that count them (likewise)

    @property
    def end(self) -> int:
        return self.start + sum(self.sizes.values())

    def describe(self) -> str:
        counts = " + ".join(map(str, self.sizes.values()))
        first = f"; the decoder half's {self.start} come first" if self.start else ""
        return f"{self.what} {self.start}-{self.end - 1} for {self.reader} ({self.settings} = {counts}{first})"


def _sizes(settings: FeatureBankConfig | UNetAlignConfig, kind: str) -> dict[str, int]:
    """Entries per partition of `kind`, from settings with n_train, n_query and n_probe."""
    return {part: getattr(settings, f"n_{part}") for part in KIND_PARTS[kind]}


def unet_folder(cfg: ProtectConfig, kind: str) -> str | None:
    """The folder of `kind` images the UNet half reads: its own, else the bank's (None: the glyph world)."""
    return getattr(cfg.unet, f"{kind}_dir") or getattr(cfg.bank, f"{kind}_dir")


def unet_start(cfg: ProtectConfig, kind: str) -> int:
    """Where the UNet half's `kind` images begin in its folder: after the decoder half's when the
    two share that folder, else at the first image."""
    bank, folder = getattr(cfg.bank, f"{kind}_dir"), unet_folder(cfg, kind)
    shared = bool(bank and folder) and Path(bank).resolve() == Path(folder).resolve()
    return sum(_sizes(cfg.bank, kind).values()) if shared else 0


def blocks(cfg: ProtectConfig) -> list[Block]:
    """Every block of folder images and prompt-file entries this run reads."""
    d = cfg.distill
    hardens = d.teacher is None  # with a teacher no part is hardened: distillation alone reads data
    reads_bank = (hardens and "decoder" in cfg.parts) or (d.enabled and d.decoder and d.decoder_steps > 0)
    reads_unet = (hardens and "unet" in cfg.parts) or d.enabled
    out = []
    for kind, parts in KIND_PARTS.items():
        names = " + ".join(f"n_{p}" for p in parts)
        if reads_bank:
            sizes = _sizes(cfg.bank, kind)
            for source, what in ((getattr(cfg.bank, f"{kind}_dir"), "images"),
                                 (getattr(cfg.bank, f"{kind}_prompts"), "prompts")):
                if source:
                    out.append(Block(source, kind, what, 0, sizes, "the decoder half", f"bank.{names}"))
        if reads_unet and (folder := unet_folder(cfg, kind)):
            sizes, reader, settings = _sizes(cfg.unet, kind), "the UNet half", f"unet.{names}"
            if d.enabled and max(d.n_images, d.n_prompts) > sizes["train"]:  # as distill.UNetData reads them
                sizes["train"] = max(d.n_images, d.n_prompts)
                reader = "the UNet half and distillation"
                settings = f"max(distill.n_images, n_prompts) + unet.{names.removeprefix('n_train + ')}"
            out.append(Block(folder, kind, "images", unet_start(cfg, kind), sizes, reader, settings))
    return out


def _entries(block: Block) -> int:
    """How many images a folder lists in its metadata.jsonl, or prompts a prompt file holds."""
    if block.what == "prompts":
        return len(load_prompt_file(block.source, block.kind))
    meta = Path(block.source) / "metadata.jsonl"
    if not meta.is_file():
        raise ConfigError(f"{block.source} has no metadata.jsonl (lines of {{\"file_name\": ..., \"text\": ...}})")
    return sum(1 for line in meta.read_text().splitlines() if line.strip())


def check_data(cfg: ProtectConfig) -> None:
    """Refuse, before any work, folders and prompt files too small for what this run reads."""
    by_source: dict[Path, list[Block]] = {}
    for block in blocks(cfg):
        by_source.setdefault(Path(block.source).resolve(), []).append(block)
    for group in by_source.values():
        have, need, what = _entries(group[0]), max(b.end for b in group), group[0].what
        if have < need:
            spans = " and ".join(b.describe() for b in group)
            shared = any(b.start for b in group)
            own = f", or give the UNet half a folder of its own (unet.{group[0].kind}_dir)" if shared else ""
            raise ConfigError(f"{group[0].source} has {have} {what}; this run needs {need}: {spans}; "
                              f"add {what} or lower those settings{own}")
