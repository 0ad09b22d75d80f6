"""storage.py: local paths and storage URIs through one interface, against a real S3-protocol
server (moto's, on loopback)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from fvae_dist.config import load_config
from fvae_dist.errors import ConfigError
from fvae_dist.storage import (UriPath, download_dir, files_under, location, arrow_path, read_json, remove_tree,
                               write_text_atomic)
from tests.s3_server import s3_server


@pytest.fixture(scope="module")
def bucket():
    with s3_server() as s3:
        uri = s3.make_bucket("store")
        saved = {key: os.environ.get(key) for key in s3.env}
        os.environ.update(s3.env)
        try:
            yield UriPath.parse(uri), s3
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def test_location_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert location("runs") == tmp_path / "runs"
    uri = location("s3://bucket/a/../b/runs?endpoint_override=127.0.0.1:9000&scheme=http")
    assert isinstance(uri, UriPath) and str(uri) == "s3://bucket/b/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert str(uri / "x" / "y.json") == "s3://bucket/b/runs/x/y.json?endpoint_override=127.0.0.1:9000&scheme=http"
    assert (uri / "x").parent == uri and (uri / "x").name == "x"
    assert str((uri / "x" / "y").relative_to(uri)) == "x/y"
    assert load_config(None, ["ray.storage_path=s3://bucket/runs", "ray.run_name=r"]).run_dir == UriPath.parse(
        "s3://bucket/runs/r")


def test_malformed_uris_and_credentials_in_uris_are_refused():
    with pytest.raises(ConfigError, match="expected a URI such as s3://bucket/folder"):
        location("s3://")
    with pytest.raises(ConfigError, match="credentials do not belong in a storage URI"):
        location("s3://KEY:SECRET@bucket/runs")
    with pytest.raises(ConfigError, match="credentials do not belong"):
        load_config(None, ["ray.storage_path=s3://KEY:SECRET@bucket/runs"])


def test_a_uri_path_reads_writes_lists_and_deletes(bucket, tmp_path):
    root, _ = bucket
    run = root / "runs" / "one"
    assert not run.exists() and read_json(run / "metrics.json") is None
    write_text_atomic(run / "metrics.json", '{"epochs_completed": 3}')
    write_text_atomic(run / "tensorboard" / "hparams" / "events.out.tfevents.1", "x")
    (run / "checkpoint_epoch0001").mkdir(parents=True)
    (run / "checkpoint_epoch0001" / "state.pt").write_bytes(b"\x00" * 10)
    assert read_json(run / "metrics.json") == {"epochs_completed": 3}
    assert run.is_dir() and (run / "metrics.json").is_file() and not (run / "metrics.json").is_dir()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_epoch0001", "metrics.json", "tensorboard"]
    assert [p.name for p in run.glob("checkpoint_*")] == ["checkpoint_epoch0001"]
    assert [str(p.relative_to(run)) for p in files_under(run, "events.out.tfevents.*")] == [
        "tensorboard/hparams/events.out.tfevents.1"]
    copy = download_dir(run / "tensorboard", tmp_path / "tb")
    assert (copy / "hparams" / "events.out.tfevents.1").read_text() == "x"
    remove_tree(run / "tensorboard")
    assert not (run / "tensorboard").exists() and (run / "metrics.json").is_file()
    assert arrow_path(run)[0] == "store/runs/one" and arrow_path(tmp_path) == (str(tmp_path), None)


def test_a_pickled_uri_path_carries_no_credentials(bucket):
    root, s3 = bucket
    path = root / "runs"
    path.exists()  # makes its file system
    data = pickle.dumps(path)
    assert s3.env["AWS_SECRET_ACCESS_KEY"].encode() not in data and s3.env["AWS_ACCESS_KEY_ID"].encode() not in data
    assert pickle.loads(data) == path
    # the file system Ray is given carries the endpoint, not the secret
    assert s3.env["AWS_SECRET_ACCESS_KEY"].encode() not in pickle.dumps(arrow_path(path)[1])


def test_local_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_text_atomic(target, "1")
    write_text_atomic(target, "2")
    assert target.read_text() == "2" and sorted(p.name for p in target.parent.iterdir()) == ["b.json"]
    assert files_under(tmp_path / "missing") == [] and files_under(tmp_path) == [target]
    assert isinstance(location(Path("x")), Path)


def test_prepare_writes_a_data_set_to_a_bucket_that_reads_back_like_a_local_one(bucket, tmp_path):
    """`prepare --out s3://...`: built locally, uploaded manifest last; its days are the local
    build's, read through the bucket (data sets there are what every node of a cluster reads)."""
    import numpy as np

    from fvae_dist.data.bars import open_source
    from fvae_dist.data.prepare import prepare_dataset
    from fvae_dist.data.shards import iter_shard_days, load_manifest, manifest_hash, shard_entries

    root, _ = bucket
    source = open_source("synthetic:stocks=12,days=160,seed=4")
    local = prepare_dataset(source, tmp_path / "local", seq_len=5, progress=False)
    remote = prepare_dataset(source, str(root / "data" / "synthetic"), seq_len=5, progress=False)
    assert isinstance(remote.path, UriPath) and not remote.reused
    assert manifest_hash(remote.path) == manifest_hash(local.path)
    manifest = load_manifest(remote.path)
    entry = shard_entries(manifest, "train")[0]
    for ours, theirs in zip(iter_shard_days(remote.path, entry, drop_nan_label=True, manifest=manifest),
                            iter_shard_days(local.path, entry, drop_nan_label=True, manifest=manifest)):
        np.testing.assert_array_equal(ours.x, theirs.x)
    assert prepare_dataset(source, str(root / "data" / "synthetic"), seq_len=5, progress=False).reused
    with pytest.raises(Exception, match="holds a data set prepared from other input"):
        prepare_dataset(open_source("synthetic:stocks=12,days=160,seed=5"), str(root / "data" / "synthetic"),
                        seq_len=5, progress=False)
