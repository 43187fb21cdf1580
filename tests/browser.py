"""Driving the console in Debian's headless Chromium (its path and arguments, with WebGL on
SwiftShader, are tests/support.py's): a throwaway profile and home per test, signing in,
and the checks every page gets (accessibility with axe-core, untranslated text)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from playwright.async_api import BrowserContext, Page, Playwright, expect

from alerts.testing import ConsoleServer
from cityops.settings import PROJECT_ROOT
from tests.support import CHROMIUM, CHROMIUM_ARGS

AXE = PROJECT_ROOT / "alerts" / "console" / "web" / "node_modules" / "axe-core" / "axe.min.js"


@contextlib.asynccontextmanager
async def chromium(playwright: Playwright, **kw: Any) -> AsyncIterator[BrowserContext]:
    """A fresh Chromium profile; HOME/TMPDIR inside a throwaway folder (Chromium writes
    crash folders there)."""
    with tempfile.TemporaryDirectory(prefix="cityops-chromium-") as home:
        ctx = await playwright.chromium.launch_persistent_context(
            str(Path(home) / "profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, env={"HOME": home, "TMPDIR": home},
            viewport=kw.pop("viewport", {"width": 1366, "height": 768}), **kw)
        try:
            yield ctx
        finally:
            await ctx.close()


async def first_page(ctx: BrowserContext) -> Page:
    return ctx.pages[0] if ctx.pages else await ctx.new_page()


async def sign_in(page: Page, console: ConsoleServer, user: str, password: str) -> None:
    await page.goto(console.url + "/")
    await expect(page).to_have_url(console.url + "/login")
    await page.fill("#username", user)
    await page.fill("#password", password)
    await page.click("#login-button")


async def axe_violations(page: Page, impacts: tuple[str, ...] = ("serious", "critical")
                         ) -> list[dict[str, Any]]:
    """axe-core's violations of these impacts on the page as it is now: rule, impact and
    where (the first few nodes), enough to fix it from the test's output."""
    await page.add_script_tag(path=str(AXE))
    result = await page.evaluate("axe.run()")
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
             "nodes": [n["target"] for n in v["nodes"][:5]],
             "summary": v["nodes"][0].get("failureSummary", "") if v["nodes"] else ""}
            for v in result["violations"] if v["impact"] in impacts]


# Text that is a catalog key rather than a message: "namespace:path" or a dotted
# lower_snake path ("console.filters.state"), or a placeholder left unfilled ("{count}").
UNTRANSLATED_JS = r"""() => {
  const NS_KEY = "[a-z][a-z0-9_]*:[a-z][a-z0-9_]*(\\.[a-z0-9_]+)*";
  const PATH = "[a-z][a-z0-9_]*(\\.[a-z0-9_]+)+";
  const KEY = new RegExp(`(^|\\s)(${NS_KEY}|${PATH})(?=$|\\s)`);
  const HOLE = /\{[a-z_]+\}/;
  const bad = [];
  const check = (where, text) => {
    const s = (text || "").trim();
    if (s && (KEY.test(s) || HOLE.test(s))) bad.push(where + ": " + s.slice(0, 120));
  };
  const walker = document.createTreeWalker(document.documentElement, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const p = n.parentElement;
    if (p && (p.closest("script, style"))) continue;
    check("text in <" + (p ? p.tagName.toLowerCase() : "?") + ">", n.nodeValue);
  }
  for (const el of document.querySelectorAll("*")) {
    for (const a of ["title", "aria-label", "placeholder", "alt"]) {
      if (el.hasAttribute(a)) check(`${a} of <${el.tagName.toLowerCase()}>`, el.getAttribute(a));
    }
  }
  for (const el of document.querySelectorAll("[data-i18n]")) {
    const key = el.dataset.i18n, text = el.textContent.trim();
    if (text === key || text === key.split(":").pop()) bad.push(`data-i18n ${key} shows its key`);
  }
  return bad;
}"""


async def untranslated(page: Page) -> list[str]:
    """Every rendered text node and title/aria-label/placeholder/alt of the page that looks
    like a catalog key instead of a message (empty when all is translated)."""
    return await page.evaluate(UNTRANSLATED_JS)  # type: ignore[no-any-return]
