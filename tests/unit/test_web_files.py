"""The try-it page's files (package data): small, and nothing in them points at another host."""
import importlib.resources
import re

WEB = importlib.resources.files("genderid") / "web"
FILES = ("index.html", "app.js", "style.css")


def test_the_page_is_three_small_files_shipped_in_the_package():
    assert sum(len((WEB / name).read_bytes()) for name in FILES) < 60_000


def test_every_link_is_relative_to_the_base_so_any_route_prefix_works():
    html = (WEB / "index.html").read_text()
    assert '<base href="{{BASE}}">' in html
    for name in FILES:
        text = (WEB / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9]", text, re.I), name  # no other host, no protocol-relative URL
    links = re.findall(r'(?:href|src)="([^"]*)"', html)
    assert links and all(not link.startswith("/") for link in links if link != "{{BASE}}"), links
    script = (WEB / "app.js").read_text()
    assert re.findall(r'fetch\("([^"]+)"', script) == ["metadata", "faces?crops=true"]
