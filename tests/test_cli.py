"""The job's command line is generated from RunConfig (pipeline/cli.py), so the two cannot drift:
every field (nested ones included) has exactly one flag, every flag is a field, its help is the
field's description, and a value given to each flag lands in that field."""

from __future__ import annotations

import argparse
from typing import Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from jobs import caption_videos
from pipeline import cli
from pipeline.config import RunConfig

REQUIRED = ["--manifest", "m.jsonl", "--output", "out", "--model", "m"]


def field_paths(model: type[BaseModel], path=()) -> dict[tuple[str, ...], object]:
    """Every leaf field of the config, by its place in it: ("generation", "top_p") -> FieldInfo."""
    found = {}
    for name, field in model.model_fields.items():
        kind = cli._nested_model(field.annotation)
        found.update(field_paths(kind, (*path, name)) if kind else {(*path, name): field})
    return found


def job_actions() -> list[argparse.Action]:
    return [a for a in caption_videos.parser()._actions if not isinstance(a, argparse._HelpAction)]


def test_every_field_has_exactly_one_flag_and_every_flag_is_a_field():
    fields = field_paths(RunConfig)
    dests = [tuple(a.dest.split(".")) for a in job_actions()]
    assert sorted(dests) == sorted(fields)  # one flag each, none left over
    assert ("generation", "max_new_tokens") in fields and ("storage", "read_timeout_s") in fields  # nested ones too


def test_each_flags_help_is_its_fields_description():
    fields = field_paths(RunConfig)
    for action in job_actions():
        field = fields[tuple(action.dest.split("."))]
        assert field.description, f"{action.dest} has no description"
        extra = cli.cli_options(field).get("help")
        assert action.help == " ".join(filter(None, [field.description, extra])).replace("%", "%%"), action.dest
    assert "%%" in caption_videos.parser()._option_string_actions["--model-cpu-threads"].help  # '+58 %', escaped
    caption_videos.parser().format_help()  # argparse %-formats every help: an unescaped % would raise here


def test_the_spellings_users_know_are_kept():
    options = {o: a.dest for a in job_actions() for o in a.option_strings}
    assert {o: options.get(o) for o in [
        "--allow-uri-prefix", "--address", "--model-resource", "--s3-endpoint-url", "--run-id", "--max-new-tokens",
        "--temperature", "--top-p", "--top-k", "--seed", "--resize-in-decoder", "--no-resize-in-decoder"]} == {
        "--allow-uri-prefix": "allowed_uri_prefixes", "--address": "ray_address", "--model-resource": "model_resources",
        "--s3-endpoint-url": "storage.endpoint_url", "--run-id": "run_id", "--max-new-tokens": "generation.max_new_tokens",
        "--temperature": "generation.temperature", "--top-p": "generation.top_p", "--top-k": "generation.top_k",
        "--seed": "generation.seed", "--resize-in-decoder": "resize_in_decoder", "--no-resize-in-decoder": "resize_in_decoder"}
    by_option = caption_videos.parser()._option_string_actions
    for flag in ["--dry-run", "--retry-errors", "--trust-remote-code"]:  # switches, as before
        assert by_option[flag].nargs == 0 and "--no-" + flag[2:] not in by_option
    assert "GPUs used: tp x replicas." in by_option["--tp"].help
    assert "Describe this video in detail." in by_option["--prompt"].help
    assert "Repeat for several" in by_option["--allow-uri-prefix"].help and by_option["--model-resource"].metavar == "NAME=AMOUNT"


def test_test_only_hooks_are_not_user_options_but_an_environment_variable(monkeypatch):
    from pipeline.media.decoder_process import DecoderProcess
    from pipeline.serve import ServeConfig

    assert "--decoder-module" not in caption_videos.parser()._option_string_actions
    assert not {"decoder_module", "rank_module"} & (set(RunConfig.model_fields) | set(ServeConfig.model_fields))
    monkeypatch.delenv("PIPELINE_TEST_DECODER_MODULE", raising=False)
    assert DecoderProcess(5).module == "pipeline.media.decoder_process"
    monkeypatch.setenv("PIPELINE_TEST_DECODER_MODULE", "tests.helpers.fault_decoder")
    assert DecoderProcess(5).module == "tests.helpers.fault_decoder"  # nothing starts until the first decode
    monkeypatch.delenv("PIPELINE_TEST_DECODER_MODULE")
    assert DecoderProcess(5, module="tests.helpers.fault_decoder").module == "tests.helpers.fault_decoder"  # named by a test


def sample(path: tuple[str, ...], field) -> tuple[list[str], object]:
    """A valid value other than the default for the field: (its command-line words, the value it must become)."""
    kind = cli._without_none(field.annotation)
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    if kind is bool:
        return [], not default  # the switch itself (--x, or --no-x where the default is on)
    if get_origin(kind) is Literal:
        choice = [c for c in get_args(kind) if c != default][-1]
        return [choice], choice
    if get_origin(kind) is list and path == ("retry_flagged",):  # quality flags by name: repeated, or comma-separated
        return ["empty", "repetition,echo"], ["empty", "repetition", "echo"]
    if get_origin(kind) is list:
        return ["s3://b/one/", "/local/two/"], ["s3://b/one/", "/local/two/"]
    if get_origin(kind) is dict:
        return ["llava_node=1", "big_memory=2.5"], {"llava_node": 1.0, "big_memory": 2.5}
    if kind is int:
        return [str(default + 1 if default is not None else 3)], default + 1 if default is not None else 3
    if kind is float:
        value = default / 2 if default else 0.5
        return [str(value)], value
    value = "s3://bucket/" + "-".join(path)  # a URI: local paths would be made absolute
    return [value], value


def test_a_value_given_to_each_flag_lands_in_its_field():
    argv, want = [], {}
    fields = field_paths(RunConfig)
    for action in job_actions():
        path = tuple(action.dest.split("."))
        words, value = sample(path, fields[path])
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[1] if value is False else action.option_strings[0])
        elif action.nargs == 0:
            argv.append(action.option_strings[0])
        elif isinstance(action, argparse._AppendAction):
            for w in words:
                argv += [action.option_strings[0], w]  # a repeated flag
        else:
            argv += [action.option_strings[0], *words]
        want[path] = value
    cfg = caption_videos.parse_args(argv)
    got = {}
    for path in want:
        obj = cfg
        for name in path:
            obj = getattr(obj, name)
        got[path] = obj
    assert got == want
    assert RunConfig.model_validate(cfg.model_dump()) == cfg  # and it is a config like any other


def test_flags_not_given_take_the_configs_defaults():
    cfg = caption_videos.parse_args(REQUIRED)
    assert cfg.model_dump(exclude={"run_id", "manifest", "output"}) == RunConfig(
        manifest="m", output="o", model="m").model_dump(exclude={"run_id", "manifest", "output"})


@pytest.mark.parametrize("argv, message", [
    (["--num-frames", "0"], "--num-frames: Input should be greater than or equal to 1"),
    (["--top-p", "2"], "--top-p: Input should be less than or equal to 1"),
    (["--quantization", "8bit", "--device", "cpu"], "quantization 8bit needs a CUDA GPU"),
    (["--model-resource", "llava_node"], "argument --model-resource: expected NAME=AMOUNT"),
    (["--model-resource", "llava_node=lots"], "argument --model-resource: expected NAME=AMOUNT"),
    (["--num-frames", "many"], "argument --num-frames: invalid int value: 'many'"),
    (["--task", "poem"], "argument --task: invalid choice: 'poem'"),
])
def test_invalid_values_exit_2_with_a_readable_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        caption_videos.parse_args(REQUIRED + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_a_missing_required_flag_is_named():
    with pytest.raises(SystemExit) as e:
        caption_videos.parse_args(["--manifest", "m.jsonl", "--output", "out"])
    assert e.value.code == 2


def test_a_field_type_without_a_command_line_form_is_refused_not_skipped():
    class Odd(BaseModel):
        when: set[int] = set()

    with pytest.raises(TypeError, match="when"):
        cli.parser_for(Odd)
