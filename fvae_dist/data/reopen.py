"""Rebuild a prepared data set from the source and settings its manifest records.

    open_manifest_source(dataset_dir) -> BarSource     the source, checked to be unchanged
    prepare_like(dataset_dir, out_dir, fit_exclude_instruments=...) -> PrepareResult

The robustness job uses this to prepare, per held-out draw, a copy of the user's data set whose
normalisation is fitted without the held-out stocks (see robustness.py). Every failure names the
manifest and what is missing: a moved file, a source that changed, or a manifest written by an
in-memory source or an older fvae-dist.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from fvae_dist.data.prepare import (PrepareResult, existing_manifest, instrument_list, prepare_dataset,
                                    prepare_settings, settings_fingerprint)
from fvae_dist.data.shards import MANIFEST_NAME, load_manifest
from fvae_dist.errors import ConfigError, FvaeError


def open_manifest_source(dataset_dir):
    """Reopen the source a data set was prepared from, checking that it still has the same content.

    Raises ConfigError naming the manifest when the manifest does not say how (an in-memory source,
    an older manifest), when a recorded file is gone, or when the source changed since."""
    from fvae_dist.data.bars import open_source

    manifest_path = Path(dataset_dir) / MANIFEST_NAME
    settings = load_manifest(dataset_dir).get("settings", {})
    args = _recorded_source(manifest_path, settings)
    spec = args["spec"]
    files = [] if spec == "synthetic" or spec.startswith("synthetic:") else [Path(spec)]
    files += [Path(args["membership"])] if args.get("membership") else []
    for path in files:
        if not path.exists():
            raise ConfigError(f"{manifest_path}: its source file {path} no longer exists (moved or deleted?); "
                              "expected it where the data set was prepared from")
    try:
        source = open_source(spec, market=args.get("market", "all"), membership=args.get("membership"))
    except FvaeError as exc:
        raise ConfigError(f"{manifest_path}: cannot reopen its source {spec}: {exc}") from exc
    found = source.fingerprint()
    if found != settings.get("source"):
        raise ConfigError(f"{manifest_path}: its source {spec} changed since the data set was prepared "
                          f"(fingerprint {settings.get('source')} -> {found}); re-run `fvae-dist prepare` for it "
                          "first")
    return source


def _recorded_source(manifest_path: Path, settings: dict) -> dict:
    args = settings.get("source_open")
    if not args:
        raise ConfigError(f"{manifest_path}: records no way to reopen its source (prepared from an in-memory "
                          "source or by an older fvae-dist); re-run `fvae-dist prepare` for it with the same "
                          "arguments (it rebuilds once and then records the source)")
    return args


def prepare_like(
    dataset_dir,
    out_dir,
    *,
    fit_exclude_instruments: Iterable[str] = (),
    source_opener: Callable[[], object] | None = None,
    progress: bool = False,
) -> PrepareResult:
    """Prepare out_dir from the source and settings recorded in dataset_dir's manifest, with the
    normalisation fitted without `fit_exclude_instruments`.

    A data set already in out_dir with the expected fingerprint is reused without opening the source
    (opening a long table means scanning it). source_opener: returns the source, e.g. a cached
    `open_manifest_source(dataset_dir)` shared by several calls; that is the default."""
    manifest = load_manifest(dataset_dir)
    settings = manifest.get("settings", {})
    _recorded_source(Path(dataset_dir) / MANIFEST_NAME, settings)
    wanted = instrument_list(fit_exclude_instruments)
    try:
        expected = prepare_settings(settings["source"], settings["source_open"], settings["splits"],
                                    settings["seq_len"], settings["feature_set"], settings["shard_rows"], wanted,
                                    settings.get("universe", "padded"))
    except KeyError as exc:
        raise ConfigError(f"{Path(dataset_dir) / MANIFEST_NAME}: settings lack {exc}; re-run `fvae-dist prepare` "
                          "for it") from None
    existing = existing_manifest(Path(out_dir))
    if existing is not None and existing.get("fingerprint") == settings_fingerprint(expected):
        return PrepareResult(Path(out_dir), reused=True, manifest=existing)
    source = (source_opener or (lambda: open_manifest_source(dataset_dir)))()
    return prepare_dataset(
        source,
        out_dir,
        splits={name: tuple(span) for name, span in settings["splits"].items()},
        seq_len=settings["seq_len"],
        feature_set=settings["feature_set"],
        shard_rows=settings["shard_rows"],
        chunk_size=manifest.get("build", {}).get("chunk_size", 256),
        progress=progress,
        fit_exclude_instruments=wanted,
        universe=settings.get("universe", "padded"),
    )
