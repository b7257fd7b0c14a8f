"""Bad input gets a clear error before any work starts."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

import modal_magic  # noqa: F401
from modal_magic import MapOptions, OptionsError
from modal_magic.checks import FunctionError

DF = pd.DataFrame({"text": ["a"], "lang": ["en"]})
CALLS: list = []


def one_arg(text):
    CALLS.append(text)
    return text


def two_args(text, lang):
    CALLS.append(text)
    return text


def gen(text):
    yield text


def notebook_function(source: str, **namespace):
    """Define a function the way a notebook cell does: in ``__main__``, so it is pickled by value."""
    scope = {"__name__": "__main__", **namespace}
    exec(source, scope)
    return scope[source.split("def ", 1)[1].split("(", 1)[0]]


@pytest.fixture(autouse=True)
def no_calls():
    CALLS.clear()
    yield
    assert not CALLS, "nothing may run when the input is bad"


def test_missing_column_lists_the_available_ones():
    with pytest.raises(KeyError, match=r"column 'txt' not found; the DataFrame has: 'text', 'lang'"):
        DF.modal.map(one_arg, column="txt", backend="sequential")


def test_map_without_column():
    with pytest.raises(TypeError, match=r"map\(\) needs column=.*'text', 'lang'"):
        DF.modal.map(one_arg)


def test_not_callable():
    with pytest.raises(FunctionError, match="expected a function to call once per row, got str"):
        DF.modal.map("one_arg", column="text")


def test_generator_function():
    with pytest.raises(FunctionError, match=r"gen is a generator function \(it uses `yield`\)"):
        DF.modal.map(gen, column="text")


def test_wrong_number_of_columns_for_the_signature():
    with pytest.raises(FunctionError, match=r"two_args\(text, lang\) can't take 1 positional argument from "
                       r"column='text'; it takes 2.*starmap"):
        DF.modal.map(two_args, column="text")
    with pytest.raises(FunctionError, match=r"one_arg\(text\) can't take 2 positional arguments"):
        DF.modal.starmap(one_arg, columns=["text", "lang"])


def test_unpicklable_global_is_named():
    uses_lock = notebook_function("def uses_lock(text):\n    with LOCK:\n        return text\n",
                                  LOCK=threading.Lock())
    with pytest.raises(FunctionError, match=r"uses_lock can't be sent to worker processes: it uses the global "
                       r"`LOCK` \(_thread.lock\).*backend='threads'"):
        DF.modal.map(uses_lock, column="text")
    # threads share memory: the same function works there
    out = DF.modal.map(uses_lock, column="text", backend="threads", progress=False)
    assert out["uses_lock"].tolist() == ["a"]


def test_unpicklable_closure_is_named():
    lock = threading.RLock()

    def locked(text):
        with lock:
            return text

    with pytest.raises(FunctionError, match=r"the closure variable `lock` \(_thread.RLock\)"):
        DF.modal.map(locked, column="text")


def test_unknown_backend_suggests():
    with pytest.raises(OptionsError, match=r"unknown backend 'thread': did you mean 'threads'\?"):
        DF.modal.map(one_arg, column="text", backend="thread")


def test_unknown_option_suggests():
    with pytest.raises(OptionsError, match=r"unknown option 'max_container'; did you mean 'max_containers'\?"):
        DF.modal.map(one_arg, column="text", max_container=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"retries": -1}, r"retries=-1 is not valid: expected a whole number of at least 0"),
        ({"max_containers": 0}, r"max_containers=0 is not valid"),
        ({"timeout": "10"}, r"timeout='10' is not valid: expected a number of seconds"),
        ({"on_error": "ignore"}, r"on_error='ignore' is not valid: expected 'capture'"),
        ({"cache": "yes"}, r"cache='yes' is not valid: expected True, False or 'refresh'"),
        ({"batch_size": 2.5}, r"batch_size=2.5 is not valid"),
        ({"progress": 1}, r"progress=1 is not valid: expected True or False"),
        ({"gpu": "A100"}, r"gpu only applies on Modal, but backend='local' runs on this machine"),
        ({"backend": "modal:no-slash"}, r"'modal:APP_NAME/FUNCTION_NAME'"),
    ],
)
def test_option_values_are_checked(kwargs, message):
    with pytest.raises(OptionsError, match=message):
        DF.modal.map(one_arg, column="text", **kwargs)


def test_options_are_immutable_and_replace_validates():
    opts = MapOptions.create(backend="threads", retries=2)
    with pytest.raises(AttributeError):
        opts.retries = 3  # type: ignore[misc]
    assert opts.replace(retries=3).retries == 3
    assert opts.retries == 2
    with pytest.raises(OptionsError):
        opts.replace(retries=-3)


def test_gpu_strings_are_checked():
    from modal_magic.gpu import parse_gpu

    assert parse_gpu("h100:2") == ("H100", 2)
    with pytest.raises(OptionsError, match=r"unknown GPU type 'L4OS': did you mean 'L40S'\?"):
        parse_gpu("L4OS")
    with pytest.raises(OptionsError, match=r"a container can have 1 to 8 T4 GPUs"):
        parse_gpu("T4:9")
    with pytest.raises(OptionsError, match=r"the count after ':' must be a whole number"):
        parse_gpu("T4:x")


# --- signatures: every option is a keyword of the accessor methods ---------------------------------------


def test_the_accessor_signatures_list_every_option_with_its_default():
    import inspect

    from modal_magic.llm import LLM_OPTIONS
    from modal_magic.options import OPTIONS

    for method in (pd.DataFrame.modal.map, pd.DataFrame.modal.starmap, pd.Series.modal.map, pd.DataFrame.modal.llm):
        parameters = inspect.signature(method).parameters
        for o in OPTIONS:
            assert parameters[o.name].kind is inspect.Parameter.KEYWORD_ONLY, (method, o.name)
            assert parameters[o.name].default == o.default, (method, o.name)
    llm = inspect.signature(pd.DataFrame.modal.llm).parameters
    assert [llm[o.name].default for o in LLM_OPTIONS] == [o.default for o in LLM_OPTIONS]
    assert llm["max_retries"].default == 5 and llm["model"].default == "gpt-4o-mini"
    retry = inspect.signature(pd.DataFrame.modal.retry_failed).parameters
    assert set(retry) >= {o.name for o in OPTIONS} and repr(retry["retries"].default) == "<as the first run>"


def test_an_unknown_llm_keyword_gets_the_closest_llm_or_map_option():
    with pytest.raises(OptionsError, match=r"unknown option 'max_token'; did you mean 'max_tokens'\?"):
        pd.DataFrame({"text": ["a"]}).modal.llm("Say {text}", max_token=3)
