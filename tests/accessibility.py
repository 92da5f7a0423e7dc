"""axe-core (npm package `axe-core`) on a page in the browser: `assert_accessible(page, context=...)`
fails with a readable list of every serious or critical violation (rule, impact, where, help URL).

The script is evaluated through the DevTools protocol, not added as a <script> element, so the
portal's Content-Security-Policy (no inline scripts) does not block it and needs no exception.
Moderate and minor findings are not failures; `axe_violations(page, impacts=...)` lists them too.
"""

from functools import cache
from pathlib import Path

AXE = Path(__file__).resolve().parent.parent / "node_modules" / "axe-core" / "axe.min.js"
BLOCKING = ("serious", "critical")
# WCAG 2.0/2.1/2.2 A and AA, and axe's best practices (landmarks, one h1, heading order...).
TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]


@cache
def axe_source() -> str:
    if not AXE.exists():
        raise AssertionError(f"{AXE} is missing: run `make setup` (npm ci installs axe-core)")
    return AXE.read_text()


def axe_violations(page, *, impacts=BLOCKING) -> list[dict]:
    """axe's violations on the page as it is now, those of the given impacts."""
    # Once nothing is moving: halfway through a fade-in (Uppy's details card) a text's colour is
    # still blending into the background, and axe would judge a contrast nobody reads.
    page.wait_for_function(
        "() => document.getAnimations().every(a => a.playState !== 'running' || a.effect?.getTiming().iterations === Infinity)",
        timeout=10_000,
    )
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(f"() => {{ {axe_source()}\n }}")
    results = page.evaluate(
        """async (tags) => {
             const result = await window.axe.run(document, {runOnly: {type: 'tag', values: tags},
                                                              resultTypes: ['violations']})
             return result.violations.map(v => ({
               id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,
               nodes: v.nodes.map(n => ({target: n.target.join(' '), summary: n.failureSummary, html: n.html}))
             }))
           }""",
        TAGS,
    )
    return [v for v in results if v["impact"] in impacts]


def describe(violations: list[dict]) -> str:
    lines = []
    for v in violations:
        lines.append(f"- {v['id']} ({v['impact']}): {v['help']} <{v['helpUrl']}>")
        for node in v["nodes"][:10]:
            lines.append(f"    at {node['target']}: {node['html'][:160]}")
            for reason in (node["summary"] or "").splitlines()[1:3]:
                lines.append(f"      {reason.strip()}")
        if len(v["nodes"]) > 10:
            lines.append(f"    ... and {len(v['nodes']) - 10} more")
    return "\n".join(lines)


def assert_accessible(page, *, context: str) -> None:
    """No serious or critical axe violation on the page as it is now; `context` names the page
    and its state in the failure message ("upload page, two files chosen")."""
    violations = axe_violations(page)
    if violations:
        raise AssertionError(f"accessibility problems on {context} ({page.url}):\n{describe(violations)}")
