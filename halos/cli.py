"""The Hydra entry points (train.py, eval.py): every mistake a user can fix ends as one line and exit status 2.

Hydra prints its own errors (an unknown `loss=` choice, an override of a key the config lacks, bad override
syntax) over several lines and exits with status 1. `run_hydra` has Hydra raise them instead and reports them
as it reports a UserError of the run itself; HYDRA_FULL_ERROR=1 still shows the traceback.
"""
import contextlib
import glob
import itertools
import os
import re
import sys
from typing import Callable, List, Optional

import yaml
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from halos.errors import USER_FULL_ERROR, ConfigError, one_line, reported_as_one_line


CONFIG_FLAGS = ('--config-path', '-cp', '--config-name', '-cn', '--config-dir', '-cd')
PATH_FLAGS = ('--config-path', '-cp', '--config-dir', '-cd')
CONFIG_GROUPS = ('loss', 'model')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_flags_first(arguments: List[str]) -> List[str]:
    """The command line with Hydra's config flags (and their values) before the overrides: Hydra's parser takes
    no override after a flag (`eval.py ++a=1 --config-path=RUN ++b=2` would end in its usage). A flag's path is
    as `config_path_flags` gives it."""
    flags, others, rest = [], [], iter(arguments)
    for argument in rest:
        flag, _, value = argument.partition('=')
        if flag not in CONFIG_FLAGS:
            others.append(argument)
            continue
        given = [argument] if '=' in argument else [argument, *itertools.islice(rest, 1)]  # or the next argument
        value = value if '=' in argument else (given[1] if len(given) > 1 else None)
        flags += config_path_flags(flag, value) or given
    return flags + others


def config_path_flags(flag: str, value: Optional[str]) -> Optional[List[str]]:
    """A config directory that is there from the working directory, as an absolute path (Hydra reads a relative one
    against the script's directory); a config file given as --config-path, as its directory and --config-name.
    None: the flag as given."""
    if flag not in PATH_FLAGS or not value or not os.path.exists(value):
        return None
    path = os.path.abspath(value)
    if os.path.isfile(path) and flag in ('--config-path', '-cp') and path.endswith(('.yaml', '.yml')):
        directory, name = os.path.split(path)
        return [f'--config-path={directory}', f'--config-name={os.path.splitext(name)[0]}']
    return [f'{flag}={path}']


def config_choices(group: str) -> str:
    """The choices of a config group (config/<group>/*.yaml), comma-separated."""
    directory = os.path.join(REPO, 'config', group)
    return ', '.join(sorted(name[:-len('.yaml')] for name in os.listdir(directory) if name.endswith('.yaml')))


def run_hydra(program: str, hydra_main: Callable[[], None], usage: Callable[[], str]) -> None:
    """Run a @hydra.main function, the errors of Hydra's composition reported as one line (exit status 2); what
    the task function itself raises stays its own. --help prints `usage()` (Hydra's own needs a whole config to
    compose; --hydra-help is still Hydra's)."""
    if {'--help', '-h'} & set(sys.argv[1:]):
        print(usage())
        sys.exit(0)
    sys.argv[1:] = config_flags_first(sys.argv[1:])
    saved = {name: os.environ.get(name) for name in ('HYDRA_FULL_ERROR', USER_FULL_ERROR)}
    os.environ[USER_FULL_ERROR] = saved[USER_FULL_ERROR] or saved['HYDRA_FULL_ERROR'] or '0'
    os.environ['HYDRA_FULL_ERROR'] = '1'  # Hydra raises what it cannot compose instead of printing it
    try:
        with reported_as_one_line(program):
            try:
                hydra_main()
            except (HydraException, OmegaConfBaseException, yaml.YAMLError, ValueError) as error:
                if raised_inside(hydra_main.__wrapped__, error) or \
                        isinstance(error, ValueError) and not unnamed_group_choice(sys.argv[1:]):
                    raise
                raise ConfigError(composition_message(error)) from error
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def task_overrides() -> List[str]:
    """The command line's overrides as typed (an interpolation in one is the config's to resolve)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    return OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)


def loss_named_otherwise(name: str) -> Optional[str]:
    """A warning where the chosen loss YAML's `name:` is not its file's (a copy of another loss's YAML, its name left
    as it was), else None: the messages, a resume's check and the run's config.yaml know the loss by that name."""
    from hydra.core.hydra_config import HydraConfig
    choice = HydraConfig.get().runtime.choices.get('loss')
    if choice is None or choice == name:
        return None
    return (f"warning: loss={choice} chose {choice}.yaml, whose name: is {name}; this run is known as loss={name} in "
            f"its messages, its config.yaml and a resume's check: write name: {choice} in {choice}.yaml")


def primary_config_dir() -> Optional[str]:
    """The directory of the config.yaml the command composed from (--config-path), where it is a file system's."""
    from hydra.core.hydra_config import HydraConfig
    return next((source.path for source in HydraConfig.get().runtime.config_sources
                 if source.provider == 'main' and source.schema == 'file'), None)


def raised_inside(function: Callable, error: Exception) -> bool:
    """Whether `error` was raised while `function` ran (one of its frames is on the traceback)."""
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code is function.__code__:
            return True
        frame = frame.tb_next
    return False


def yaml_error_line(error: yaml.YAMLError) -> str:
    """A YAML parse error as one line: `<file> line L, column C: not valid YAML: <problem>`."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{mark.name} line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {error.problem}"
    return f"not valid YAML: {one_line(error)}"


class TaggedYamlLoader(yaml.SafeLoader):
    """A YAML reader for files written for other tools (lm-eval's task YAMLs): their tags, such as !function,
    are read as plain values."""


TaggedYamlLoader.add_multi_constructor('!', lambda loader, suffix, node: None)


def skipped_task_files(directory: str) -> List[str]:
    """Each *.yaml under `directory` that lm-eval skips without a word: `yaml_error_line` of one that is not valid
    YAML, and one that names no task or group."""
    problems = []
    for path in sorted(glob.glob(os.path.join(directory, '**', '*.yaml'), recursive=True)):
        with open(path) as f:
            try:
                config = yaml.load(f, TaggedYamlLoader)
            except yaml.YAMLError as error:
                problems.append(yaml_error_line(error))
                continue
        if not (isinstance(config, dict) and ({'task', 'group'} & set(config))):
            problems.append(f"{path} names no task (no 'task:' key)")
    return problems


def unnamed_group_choice(arguments: List[str]) -> Optional[str]:
    """The first `group=value` of the command line whose value Hydra reads as no name (a number, null, true)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parser = OverridesParser.create()
    for argument in arguments:
        group = argument.partition('=')[0]
        if group in CONFIG_GROUPS:
            with contextlib.suppress(HydraException):
                value = parser.parse_overrides([argument])[0].value()
                if not isinstance(value, (str, list)):
                    return (f"{argument}: {group} takes the name of a config/{group}/*.yaml, one of "
                            f"{config_choices(group)}")
    return None


def unparsed_override(error: OverrideParseException) -> str:
    """An override Hydra's grammar cannot read, with the character it stopped at where it says which (a value
    holding it reads once quoted)."""
    lines = error.message.split('\n')
    label = 'LexerNoViableAltException: '
    if lines[0].startswith(label) and len(lines) > 1 and '^' in lines[1]:
        column = lines[1].index('^') - len(label)
        if 0 <= column < len(error.override):
            key, _, value = error.override.partition('=')
            return (f"{error.override}: Hydra reads {error.override[column]!r} only inside quotes: quote the value "
                    f"inside the shell's quotes, '{key}=\"{value}\"'")
    return f"{error.override}: Hydra cannot read it: {lines[0]}"


def composition_message(error: Exception) -> str:
    """Hydra's message as one line; an unknown choice of a config group with the choices there are."""
    if isinstance(error, yaml.YAMLError):
        return yaml_error_line(error)
    if isinstance(error, OverrideParseException):
        return unparsed_override(error)
    choice = unnamed_group_choice(sys.argv[1:]) if isinstance(error, ValueError) else None
    if choice:
        return choice
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition('/')
        return f"{group}={name}: config/{group} has no {name}.yaml; the choices are {', '.join(sorted(error.options))}"
    ungrouped = ungrouped_config_path(error, sys.argv[1:])
    if ungrouped:
        return ungrouped
    unknown = re.search(r"Could not override '([^']+)'.*use \+(.+)$", str(error), re.DOTALL)
    if unknown:
        from halos.build import unknown_override
        return unknown_override(unknown.group(1), unknown.group(2).strip())
    missing_dir = re.search(r"config directory '([^']+)' exists", str(error))
    if isinstance(error, MissingConfigException) and missing_dir:
        return (f"--config-path={missing_dir.group(1)}: no such directory; give a run directory "
                "(<cache_dir>/<exp_name>, where train.py saved config.yaml) or --config-path=config (halos' defaults)")
    primary = re.search(r"primary config '([^']+)'", str(error))
    if isinstance(error, MissingConfigException) and primary and primary.group(1) not in ('config', 'config.yaml'):
        return (f"--config-name={primary.group(1)}: no {primary.group(1)}.yaml in the config directory (halos' config "
                f"is config.yaml: leave --config-name out)")
    if isinstance(error, MissingConfigException) and 'primary config' in str(error):
        return ("no config.yaml to start from: give --config-path=<a run directory> (the config.yaml the run saved) "
                "or --config-path=config (halos' defaults)")
    return one_line(error) + unread_config_dir(sys.argv[1:])


def ungrouped_config_path(error: Exception, arguments: List[str]) -> Optional[str]:
    """Where a config.yaml copied out of config/ (--config-path) chooses a loss or model that no group beside it
    holds: that halos' groups are to be added."""
    missing = re.match(r"(?:In '[^']+': Could not find '([a-z]+)/[^']*'|You must specify '([a-z]+)')", str(error))
    group = missing and (missing.group(1) or missing.group(2))
    path = next((value for flag, _, value in (argument.partition('=') for argument in arguments)
                 if flag in ('--config-path', '-cp')), None)
    if group not in CONFIG_GROUPS or path is None or os.path.isdir(os.path.join(path, group)):
        return None
    return (f"--config-path={path} has no {group}/ directory of config groups, which its config chooses from: "
            f"add --config-dir={os.path.join(REPO, 'config')} to choose halos' {group}=<name>")


def unread_config_dir(arguments: List[str]) -> str:
    """Where a --config-dir holds a config.yaml: that Hydra does not compose from it, as the user may think."""
    for flag, _, value in (argument.partition('=') for argument in arguments):
        if flag in ('--config-dir', '-cd') and os.path.isfile(os.path.join(value, 'config.yaml')):
            return (f" ({flag}={value} adds config groups, and its config.yaml is not read: to compose from it, give "
                    f"--config-path={value})")
    return ''
