"""Chat templates have resource limits: hostile ones stop at a count (loop turns, items, characters,
depth) while still small, real ones never notice.

Hostile templates run in a child process (under RLIMIT_AS, so that a regression cannot take the
machine down) which reports each one's outcome, its time and the child's peak RSS (VmHWM). Real
templates are every template of the pinned llama.cpp source (models/templates/).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

import llama_source  # beside build_llama (tests/upstream.py puts the repository on sys.path)
import mullama
from mullama.chat import _template

TEMPLATES_DIR = llama_source.ensure_source() / "models" / "templates"
TEMPLATES = sorted(path.name for path in TEMPLATES_DIR.glob("*.jinja"))
CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "What is 2+2?"}]
# firefunction-v2 concatenates `functions` and `datetime` into its system prompt; jinja2 refuses to
# add an undefined value to a string (llama.cpp's own engine prints it as empty), so give it both.
EXTRA_VARIABLES = {"fireworks-ai-llama-3-firefunction-v2.jinja": {"functions": "[]", "datetime": "26 Nov 2026"}}

S9 = "{% set s = 'x' * 9000000 %}"  # a 9 MB string, allowed (the limit is 10 million characters)
COPIES = "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = ns.l + [COPY] %}{% endfor %}"
# (template, the limit its error must name)
HOSTILE = [
    # the two from the hardening issue
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
     "{% endfor %}{% endfor %}{% endfor %}", "MAX_LOOP_ITERATIONS"),
    ("{% set a = [0] * 10**8 %}", "MAX_ITEMS"),
    # repetition, padding, formatting widths
    ("{{ 'a' * 10**9 }}", "MAX_OUTPUT_CHARS"),
    ("{{ 'x'.ljust(10**9) }}", "MAX_OUTPUT_CHARS"),
    ("{{ 'x'.rjust(10**9) }}", "MAX_OUTPUT_CHARS"),
    ("{{ 'x'.center(10**9) }}", "MAX_OUTPUT_CHARS"),
    ("{{ 'x'.zfill(10**9) }}", "MAX_OUTPUT_CHARS"),
    ("{{ ('x'|safe).ljust(10**9) }}", "MAX_OUTPUT_CHARS"),
    ("{{ '\t'.expandtabs(10**9) }}", "MAX_OUTPUT_CHARS"),
    ("{{ (1).to_bytes(10**9, 'big') }}", "MAX_OUTPUT_CHARS"),
    ("{{ '{:>1000000000}'.format(1) }}", "MAX_OUTPUT_CHARS"),
    ("{{ '{:{w}}'.format(1, w=10**9) }}", "MAX_OUTPUT_CHARS"),
    ("{{ '{x:>999999999}'.format_map({'x': 1}) }}", "MAX_OUTPUT_CHARS"),
    ("{{ '%999999999s' % 'x' }}", "MAX_OUTPUT_CHARS"),
    ("{{ '%*s' % (10**9, 'x') }}", "MAX_OUTPUT_CHARS"),
    ("{{ '%999999999s'|format('x') }}", "MAX_OUTPUT_CHARS"),
    ("{{ 'x'|center(10**9) }}", "MAX_OUTPUT_CHARS"),
    ("{{ 'x\ny'|indent(10**9) }}", "MAX_OUTPUT_CHARS"),
    ("{{ strftime_now('%c' * 10**6) }}", "MAX_OUTPUT_CHARS"),
    ("{{ [[[1]]]|tojson(indent=10**9) }}", "MAX_JSON_INDENT"),
    # joins, replacements, concatenations
    ("{{ ('x' * 1000000).join(['a'] * 1000) }}", "MAX_OUTPUT_CHARS"),
    ("{{ ','.join(range(10**9)) }}", "MAX_ITEMS"),
    ("{{ (['x' * 9000000] * 50)|join }}", "MAX_OUTPUT_CHARS"),
    ("{{ ('a' * 100000).replace('a', 'b' * 1000) }}", "MAX_OUTPUT_CHARS"),
    ("{{ ('a' * 100000)|replace('a', 'b' * 1000) }}", "MAX_OUTPUT_CHARS"),
    ("{{ ('x' * 9000000).translate({120: 'yy'}) }}", "MAX_OUTPUT_CHARS"),
    ("{{ 'x' * 10**7 ~ 'y' * 10**7 }}", "MAX_OUTPUT_CHARS"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "MAX_OUTPUT_CHARS"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "MAX_OUTPUT_CHARS"),
    ("{% macro m(x) %}{% for i in range(100000) %}{{ x }}{% endfor %}{% endmacro %}{% set y = m('x' * 1000) %}",
     "MAX_OUTPUT_CHARS"),
    # big integers
    ("{{ 10 ** (10**8) }}", "MAX_INT_BITS"),
    ("{{ (2**60000) * (2**60000) }}", "MAX_INT_BITS"),
    # items
    ("{{ range(10**9)|list }}", "MAX_ITEMS"),
    ("{{ ('x' * 5000000)|list|length }}", "MAX_ITEMS"),
    ("{{ ('a b ' * 2500000).split()|length }}", "MAX_ITEMS"),
    ("{{ ('ab\n' * 3000000).splitlines()|length }}", "MAX_ITEMS"),
    ("{{ [1]|batch(10**9, 0)|list }}", "MAX_ITEMS"),
    ("{{ [1]|slice(10**9)|list }}", "MAX_ITEMS"),
    ("{{ ([[0] * 100000] * 100000)|sum(start=[]) }}", "MAX_ITEMS"),
    ("{{ lipsum(10**6) }}", "MAX_ITEMS"),
    ("{{ ('<' * 1000000)|striptags }}", "SLOW_FILTER_INPUT"),
    # printing a list prints every item: 1,000 references to one 9 MB string are 9 GB of text
    (S9 + "{{ [s] * 1000 }}", "MAX_OUTPUT_CHARS"),
    (S9 + "{{ ([s] * 1000)|string }}", "MAX_OUTPUT_CHARS"),
    (S9 + "{{ ([s] * 1000)|tojson }}", "MAX_OUTPUT_CHARS"),
    (S9 + "{{ 'a' ~ [s] * 1000 }}", "MAX_OUTPUT_CHARS"),
    (S9 + "{{ '%s' % ([s] * 1000,) }}", "MAX_OUTPUT_CHARS"),
    (S9 + "{{ '{}'.format([s] * 1000) }}", "MAX_OUTPUT_CHARS"),
    (S9 + "{{ raise_exception([s] * 1000) }}", "MAX_OUTPUT_CHARS"),
    # work and time
    ("{% for x in 'x' * 5000000 %}{% endfor %}", "MAX_LOOP_ITERATIONS"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
     "MAX_LOOP_ITERATIONS"),
    ("{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
     "MAX_RENDER_SECONDS"),
    ("{% set l = range(100000)|list %}{% for i in range(100) %}{{ l|groupby('real')|length }}{% endfor %}",
     "MAX_RENDER_SECONDS"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion limit"),
    ("{% for i in range(100000) recursive %}{{ loop(range(100000)) }}{% endfor %}", "recursion limit"),
    # memory: keeping a thousand fresh 9 MB copies, made in six different ways
    (S9 + COPIES.replace("COPY", "s ~ i"), "MAX_RENDER_MEMORY"),
    (S9 + COPIES.replace("COPY", "s[i:]"), "MAX_RENDER_MEMORY"),
    (S9 + COPIES.replace("COPY", "s.upper()"), "MAX_RENDER_MEMORY"),
    (S9 + COPIES.replace("COPY", "s|lower"), "MAX_RENDER_MEMORY"),
    ("{% macro m(x) %}{{ x }}{{ x }}{% endmacro %}{% set s = 'x' * 4000000 %}" + COPIES.replace("COPY", "m(s)"),
     "MAX_RENDER_MEMORY"),
    ("{% set s = 'x' * 4000000 %}" + COPIES.replace("[COPY]", "[x]").replace(
        "{% set ns.l", "{% set x %}{{ s }}{{ i }}{% endset %}{% set ns.l"), "MAX_RENDER_MEMORY"),
]

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import mullama
    from mullama.chat._template import render_chat_template

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    # a safety net only: a template that got past its limits fails here instead of the machine
    resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + 3 * 2**30,) * 2)
    start = status("VmRSS")
    results = []
    for source in json.load(sys.stdin):
        began = time.monotonic()
        try:
            render_chat_template(source, [{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                 bos_token="", eos_token="")
            outcome = ["rendered", ""]
        except mullama.MullamaError as error:
            outcome = [error.code, str(error)]
        except BaseException as error:
            outcome = [type(error).__name__, str(error)[:500]]
        results.append({"outcome": outcome, "seconds": time.monotonic() - began,
                        "peak_growth": status("VmHWM") - start})
    json.dump(results, sys.stdout)
""")


@pytest.fixture(scope="module")
def hostile_results():
    """Every hostile template, rendered one after the other in one child process."""
    began = time.monotonic()
    child = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps([t for t, _ in HOSTILE]),
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout)
    print(f"\n{len(results)} hostile templates in {time.monotonic() - began:.1f} s; peak RSS growth "
          f"{max(r['peak_growth'] for r in results) / 2**20:.0f} MB; slowest "
          f"{max(r['seconds'] for r in results):.2f} s")
    return dict(zip([t for t, _ in HOSTILE], results))


@pytest.mark.parametrize(("template", "limit"), HOSTILE, ids=[f"{i:02d}" for i in range(len(HOSTILE))])
def test_hostile_templates_are_stopped_by_a_limit_while_small(hostile_results, template, limit):
    result = hostile_results[template]
    code, message = result["outcome"]
    assert code == "TEMPLATE_ERROR", result
    assert limit in message, message  # a count was reached (their times are printed, not asserted)
    # the child's peak RSS over every template so far: refused work never ran
    assert result["peak_growth"] < 200 * 2**20, result


@pytest.mark.parametrize(("template", "limit"), [
    ("{{ x }}" * 200_000, "MAX_TEMPLATE_CHARS"),  # 1.4 MB of source: 40 s to compile without the limit
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "recursion limit"),
    ("{% if true %}" * 3000 + "x" + "{% endif %}" * 3000, "recursion limit"),
], ids=["size", "nested-expression", "nested-blocks"])
def test_hostile_template_sources_are_refused_before_compiling(template, limit):
    with pytest.raises(mullama.TemplateError) as info:
        _template.render_chat_template(template, CONVERSATION, add_generation_prompt=True, bos_token="", eos_token="")
    assert info.value.code == "TEMPLATE_ERROR" and limit in str(info.value)


def test_a_limit_breach_is_a_template_error_through_the_public_api(model):
    with pytest.raises(mullama.TemplateError) as info:
        model.apply_chat_template(CONVERSATION, template=HOSTILE[0][0])
    assert info.value.code == "TEMPLATE_ERROR" and "MAX_LOOP_ITERATIONS" in str(info.value)


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_upstream_template_renders_within_the_limits(name):
    source = (TEMPLATES_DIR / name).read_text(encoding="utf-8")
    prompt = _template.render_chat_template(source, CONVERSATION, add_generation_prompt=True, bos_token="<s>",
                                        eos_token="</s>", **EXTRA_VARIABLES.get(name, {}))
    assert "What is 2+2?" in prompt


def test_a_long_conversation_renders_in_a_template_that_rebuilds_its_prompt():
    """Reka-Edge appends every message to one string (ns.out = ns.out ~ ...): 400 messages of 5,000
    characters allocate about 800 MB of strings that are freed at once, which MAX_RENDER_MEMORY allows."""
    source = (TEMPLATES_DIR / "Reka-Edge.jinja").read_text(encoding="utf-8")
    messages = []
    for i in range(200):
        messages += [{"role": "user", "content": (f"question {i} " * 500)[:5000]},
                     {"role": "assistant", "content": (f"answer {i}. " * 500)[:5000]}]
    messages.append({"role": "user", "content": "last"})
    prompt = _template.render_chat_template(source, messages, add_generation_prompt=True, bos_token="", eos_token="")
    assert len(prompt) > 2_000_000 and prompt.count("question 199") >= 1


def test_limits_grow_with_the_conversation_for_templates_that_compare_every_pair_of_messages():
    """Gemma 4's template scans all earlier messages for each message: 1,500 messages are 1.1 million
    loop iterations, past MAX_LOOP_ITERATIONS, within its allowance of one per pair of messages."""
    source = (TEMPLATES_DIR / "google-gemma-4-31B-it.jinja").read_text(encoding="utf-8")
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(1501)]
    prompt = _template.render_chat_template(source, messages, add_generation_prompt=True, bos_token="<bos>",
                                        eos_token="<eos>")
    assert "message 1500" in prompt


def test_budgets_are_per_render():
    """600,000 loop iterations twice: each render has its own MAX_LOOP_ITERATIONS (1,000,000)."""
    source = "{% for i in range(6) %}{% for j in range(100000) %}{% endfor %}{% endfor %}ok"
    for _ in range(2):
        assert _template.render_chat_template(source, CONVERSATION, add_generation_prompt=False, bos_token="",
                                          eos_token="") == "ok"


def test_generation_blocks_render_their_body():
    """transformers' {% generation %} markers (LFM2.5, Laguna): llama.cpp ignores the tags, so do we."""
    source = "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    assert _template.render_chat_template(source, CONVERSATION, add_generation_prompt=False, bos_token="",
                                      eos_token="") == "[Hi][Hello! How can I help?][What is 2+2?]"


def test_limited_operations_keep_their_meaning():
    """The guarded operators, methods and filters give what plain Python and jinja2 give."""
    source = ("{{ 'ab' * 3 }}|{{ [1] * 2 }}|{{ 2 ** 10 }}|{{ 'x' + 'y' }}|{{ [1] + [2] }}|{{ '%5s|%-3d' % ('a', 7) }}"
              "|{{ '{:>4}{}'.format(1, 'z') }}|{{ 'a,b'.split(',') }}|{{ '-'.join(['a', 'b']) }}"
              "|{{ 'aXa'.replace('a', 'bb') }}|{{ 'x'.center(5, '*') }}|{{ [[1], [2]]|sum(start=[]) }}"
              "|{{ 'a\nb'|indent(2, true) }}|{{ {'k': 'é'}|tojson(indent=1) }}|{{ 'abcdef'[1:4] }}"
              "|{{ 'a' ~ 1 ~ none }}|{{ messages|map(attribute='role')|join(' ') }}|{{ (messages|list)[0].role }}"
              "|{% for m in messages if m.role == 'user' %}{{ loop.index }}/{{ loop.length }} {% endfor %}")
    expected = ("ababab|[1, 1]|1024|xy|[1, 2]|    a|7  |   1z|['a', 'b']|a-b|bbXbb|**x**|[1, 2]|  a\n  b"
                '|{\n "k": "é"\n}|bcd|a1None|user assistant user|user|1/2 2/2 ')
    assert _template.render_chat_template(source, CONVERSATION, add_generation_prompt=False, bos_token="",
                                      eos_token="") == expected
