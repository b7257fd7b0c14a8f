"""``%%modal_deploy``: deploy the function a cell defines to Modal by name, optionally on a schedule.

``%%modal_deploy APP/NAME --schedule "0 2 * * *"`` runs the cell in the user namespace, picks its
function (the last top-level ``def``, or ``--fn NAME``) and makes one call into
:func:`modal_magic.deploy`, then prints the deployment: its name, its schedule and how to call it.
The container flags are ``%%modal_map``'s own (generated from the same option declarations), and
their ``%config ModalMagic`` defaults apply, so a function deploys on the image it was mapped on.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, magics_class

from ..checks import FunctionError
from ..deploy import CONTAINER_OPTIONS, deploy
from ..errors import ModalSetupError, OptionsError
from ..options import OPTIONS
from ..schedules import parse_every
from .parsing import (add_option_flags, define_function, in_flag_words, make_parser, map_options, option_flags,
                      parse_known, split_line)

__all__ = ["DeployMagic", "parse_deploy_line"]

_CONTAINER = [o for o in OPTIONS if o.name in CONTAINER_OPTIONS]

_DOC = """\
Deploy the function this cell defines to Modal as APP/NAME, a persistent Function that runs on a
schedule (--schedule CRON or --every INTERVAL) or when called: by name with
modal.Function.from_name("APP", "NAME"), or over a column with
df.modal.map(None, column=..., backend="modal:APP/NAME"). Deploying the same name again replaces it.
The container flags are those of %%modal_map; their %config ModalMagic defaults apply.
"""

_EXAMPLES = """\
Examples::

    %%modal_deploy reviews/nightly --schedule "0 2 * * *" --volume /data=reviews --pip vaderSentiment
    def nightly():
        ...

    %%modal_deploy reviews/score --gpu T4 --fn score
"""


def _parser() -> Any:
    parser = make_parser("modal_deploy", _DOC)
    parser.add_argument("name", metavar="APP/NAME", help="The Modal app and the function's name in it.")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--schedule", metavar="CRON",
                      help='Run on this cron schedule (UTC), e.g. "0 2 * * *" for 02:00 every night. Quote it.')
    when.add_argument("--every", metavar="INTERVAL", help="Run at this interval: 30m, 6h, 1d, 2w...")
    parser.add_argument("--fn", metavar="NAME", help="The function to deploy (default: the cell's last top-level def).")
    add_option_flags(parser, _CONTAINER, config_class="ModalMagic")
    return parser


#: The ``%%modal_deploy`` parser, generated once from the container options' declarations.
PARSER = _parser()


def parse_deploy_line(line: str) -> dict[str, Any]:
    """The ``%%modal_deploy`` line's arguments: ``name``, ``schedule``, ``fn`` and the container options.

    Examples
    --------
    >>> args = parse_deploy_line('jobs/nightly --every 6h --gpu T4 --pip pandas')
    >>> args["name"], args["options"]
    ('jobs/nightly', {'gpu': 'T4', 'pip': ['pandas']})
    >>> args["schedule"].proto_message.period.hours
    6
    """
    given = parse_known(PARSER, split_line(line, "modal_deploy"), stray="the line takes one APP/NAME")
    if "name" not in given:
        raise UsageError("%%modal_deploy needs the name to deploy as: %%modal_deploy APP/NAME [--schedule CRON]")
    try:
        schedule = parse_every(given["every"]) if "every" in given else given.get("schedule")
    except OptionsError as error:
        raise UsageError(in_flag_words(str(error)).replace("every=", "--every ")) from None
    return {"name": given["name"], "schedule": schedule, "fn": given.get("fn"),
            "options": option_flags(given, _CONTAINER)}


@magics_class
class DeployMagic(Magics):
    """``%%modal_deploy APP/NAME [--schedule CRON | --every INTERVAL] [container flags]``."""

    @cell_magic
    def modal_deploy(self, line: str, cell: str) -> None:
        args = parse_deploy_line(line)
        fn = define_function(self.shell, cell, args["fn"], what="the function to deploy")
        options = map_options(self.shell.user_ns, self._container_defaults(), {**args["options"], "backend": "modal"})
        chosen = {name: getattr(options, name) for name in CONTAINER_OPTIONS}
        try:
            deployment = deploy(fn, args["name"], schedule=args["schedule"], **chosen)
        except (OptionsError, FunctionError, ModalSetupError) as error:
            raise UsageError(in_flag_words(str(error))) from None
        print(deployment)

    modal_deploy.__doc__ = PARSER.format_help() + "\n" + _EXAMPLES

    def _container_defaults(self) -> dict[str, Any]:
        configured = self.shell.magics_manager.registry.get("ModalMagic")
        if configured is None:
            return {}
        return {name: value for name, value in configured.option_defaults().items() if name in CONTAINER_OPTIONS}
