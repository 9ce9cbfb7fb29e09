"""ebr.config: flags generated from dataclasses, --config and --set, the order they apply in,
and the configuration a command records beside its output."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from ebr import config


@dataclasses.dataclass
class Inner:
    window: tuple[int, ...] = (101, 500)
    ratio: str = "100:1"


@dataclasses.dataclass
class Cmd:
    query: str = dataclasses.field(default="", metadata={"positional": True, "help": "query text"})
    output: str = config.required("where the output goes")
    batch_size: int = 256  # examples per batch
    k: int = dataclasses.field(default=10, metadata={"flags": ("-k",)})
    shuffle: bool = True  # reshuffle every epoch
    ks: list[int] = config.setting([10, 50], "recall cut-offs")
    params: dict | None = None  # backend search parameters
    radius: float | None = None
    mode: str = dataclasses.field(default="hash", metadata={"choices": ("hash", "time")})
    inner: Inner = dataclasses.field(default_factory=Inner)


def parse(argv: list[str]) -> Cmd:
    parser = argparse.ArgumentParser(prog="cmd", exit_on_error=False)
    config.add_arguments(parser, Cmd)
    return config.from_args(Cmd, parser.parse_args(argv))


def test_flags_types_and_defaults_from_the_dataclass():
    cfg = parse(["--output", "out", "hello"])
    assert cfg == Cmd(query="hello", output="out")
    cfg = parse(["--output=o", "--batch-size", "8", "-k", "3", "--no-shuffle", "--ks", "1,5",
                 "--ks", "100", "--params", "nprobe=32",
                 "--params", "mode=fast", "--radius", "0.5", "--mode", "time"])
    assert (cfg.batch_size, cfg.k, cfg.shuffle, cfg.ks, cfg.radius, cfg.mode) == (
        8, 3, False, [1, 5, 100], 0.5, "time")
    assert cfg.params == {"nprobe": 32, "mode": "fast"}
    assert parse(["--output=o", "--params", '{"nprobe": 4}', "--radius", "none"]).radius is None


def test_order_defaults_file_flags_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("output: from-file\nbatch_size: 64\nk: 7\ninner:\n  ratio: '10:1'\n")
    cfg = parse(["--config", str(f), "-k", "5", "--set", "k=6", "--set", "inner.window=1,20"])
    assert (cfg.output, cfg.batch_size, cfg.k) == ("from-file", 64, 6)
    assert cfg.inner == Inner(window=(1, 20), ratio="10:1")


def test_bad_input_names_the_key_or_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--output is required"):
        parse([])
    with pytest.raises(ValueError, match=r"config\.batch_size: expected int, got 'x'"):
        parse(["--output=o", "--batch-size", "x"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['nprobe'\] for Cmd"):
        parse(["--output=o", "--set", "nprobe=4"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['size'\] for Inner"):
        parse(["--output=o", "--set", "inner.size=4"])
    with pytest.raises(ValueError, match=r"--params 'nprobe' is not key=value"):
        parse(["--output=o", "--params", "nprobe"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"k": 1,\n "output": }')
    with pytest.raises(ValueError, match=rf"config file {bad}: line 2"):
        parse(["--config", str(bad)])
    with pytest.raises(FileNotFoundError, match="config file nope.json does not exist"):
        parse(["--config", "nope.json"])
    with pytest.raises(argparse.ArgumentError):
        parse(["--output=o", "--mode", "random"])


def test_help_shows_comments_and_defaults():
    parser = argparse.ArgumentParser(prog="cmd")
    config.add_arguments(parser, Cmd)
    text = parser.format_help()
    assert "examples per batch (default: 256)" in text
    assert "reshuffle every epoch (default: true)" in text
    assert "--no-shuffle" in text and "-k K" in text
    assert "inner settings" in text and "--inner.ratio RATIO" in text
    assert "--batch_size" not in text  # the settings' own spelling is accepted, not listed
    assert "where the output goes" in text and "recall cut-offs (default: [10, 50])" in text
    assert Cmd().ks is not Cmd().ks  # a list default is copied per instance


def test_section_flags_and_the_settings_own_spelling():
    cfg = parse(["--output=o", "--inner.ratio", "1:1", "--batch_size=4", "--inner.window=5,9"])
    assert (cfg.inner, cfg.batch_size) == (Inner(window=(5, 9), ratio="1:1"), 4)


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=lambda: Inner(ratio="3:1"))


def test_a_partial_section_keeps_the_section_defaults():
    parser = argparse.ArgumentParser(prog="cmd")
    config.add_arguments(parser, Outer)
    assert config.from_args(Outer, parser.parse_args([])) == Outer()
    cfg = config.from_args(Outer, parser.parse_args(["--set", "inner.window=1,2"]))
    assert cfg.inner == Inner(window=(1, 2), ratio="3:1")


def test_announce_and_save(tmp_path, caplog):
    cfg = parse(["--output=o", "q"])
    with caplog.at_level("INFO", logger="ebr.config"):
        config.announce("cmd", cfg)
    assert '"batch_size": 256' in caplog.text and "ebr cmd configuration" in caplog.text
    path = config.save(cfg, str(tmp_path / "run"))
    saved = json.loads(open(path).read())
    assert saved["query"] == "q" and saved["inner"]["window"] == [101, 500]
    assert config.load(Cmd, path) == cfg


def test_save_and_load_on_object_storage(gcs_root):
    cfg = parse(["--output=o", "--batch-size=3"])
    path = config.save(cfg, gcs_root)
    assert path == f"{gcs_root}/config.json"
    assert config.load(Cmd, path) == cfg


@dataclasses.dataclass
class WithMapping:
    train: dict = dataclasses.field(default_factory=lambda: {"epochs": 3, "batch_size": 512})


def test_mappings_merge_key_by_key(tmp_path):
    def parse_mapping(argv):
        parser = argparse.ArgumentParser(prog="cmd")
        config.add_arguments(parser, WithMapping)
        return config.from_args(WithMapping, parser.parse_args(argv)).train

    assert parse_mapping([]) == {"epochs": 3, "batch_size": 512}
    assert parse_mapping(["--train", "epochs=1"]) == {"epochs": 1, "batch_size": 512}
    assert parse_mapping(["--set", "train.epochs=2"]) == {"epochs": "2", "batch_size": 512}
    f = tmp_path / "c.json"
    f.write_text('{"train": {"lr": 0.1}}')
    assert parse_mapping(["--config", str(f), "--train", "eval_ks=10,50"]) == {
        "epochs": 3, "batch_size": 512, "lr": 0.1, "eval_ks": "10,50"}


def _leaf_commands(parser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaf_commands(sub, path + (name,))


def test_every_ebr_command_takes_config_and_set():
    from ebr.cli import build_parser

    commands = dict(_leaf_commands(build_parser()))
    assert {"train", "pipeline examples", "index build", "serve retrieval", "demo",
            "mine-negatives", "experiment paper-tables", "data social", "query", "retrain run",
            "retrain submit"} <= set(commands)
    missing = [name for name, p in commands.items()
               if not {"--config", "--set"} <= set(p._option_string_actions)]
    assert missing == []
