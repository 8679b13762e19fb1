"""Error messages in English, 简体中文 and 日本語: the catalogs cover every message the source raises, and real
errors come back translated over the UI and HTTP, with their values and ``field`` unchanged."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import gradio as gr
import pytest

from tests.conftest import ADMIN_PASSWORD, login
from webapp.i18n import extract as extractor
from webapp.i18n import translate, use_language
from webapp.i18n.catalog import template_pattern

LANGUAGES = extractor.TARGET_LANGUAGES


# -- (a) the catalogs cover the source --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def found() -> extractor.Found:
    return extractor.extract()


def test_every_message_in_the_source_has_a_zh_and_ja_translation_keeping_its_values(found):
    assert len(found.templates) > 400  # the extractor sees the tree (services, engine, backends, UI)
    problems = []
    for language in LANGUAGES:
        messages = extractor.read_catalog(language)["messages"]
        for template in sorted(found.templates):
            for problem in extractor.problems(template, messages.get(template)):
                problems.append(f"{language}: {problem}: {template!r} ({', '.join(found.templates[template])})")
    assert not problems, ("run `python -m webapp.i18n.extract` and translate:\n" + "\n".join(problems[:40]))


def test_the_catalogs_hold_no_stale_or_missing_entries(found):
    """Exactly the source's templates: the extractor was run after the last change to a message."""
    for language in LANGUAGES:
        assert set(extractor.read_catalog(language)["messages"]) == set(found.templates), language


def test_translations_use_the_products_terms():
    ja = extractor.read_catalog("ja")["messages"]
    zh = extractor.read_catalog("zh-CN")["messages"]
    assert "チェックポイント" in ja["no checkpoint {0}"] and "检查点" in zh["no checkpoint {0}"]
    assert "訓練" in ja["no training {0}"] and "训练" in zh["no training {0}"]
    assert "推論" in ja["no inference {0}"] and "推理" in zh["no inference {0}"]
    assert "エンドポイント" in ja["no endpoint is configured to run jobs"]
    assert "データセット" in ja["no dataset with id {0}"] and "数据集" in zh["no dataset with id {0}"]
    assert "model:all" in ja["only the owner of {0} or a holder of model:all may change it"]  # permissions kept
    assert "`base_type`" in zh["`base_type` must be one of {0} but is {1}"]  # identifiers kept


def test_real_raise_sites_are_found_with_their_values_as_placeholders(found):
    expected = {
        "no user named {0}": "webapp/services/users.py",  # f-string with a !r value
        "{0} lacks the permission {1}": "webapp/services/access.py",
        # a conditional part (`target = f" on {what}" if what else ""`) gives both variants
        "{0} may not {1} on {2}: it belongs to another user (that needs {3}:all)": "webapp/services/access.py",
        "{0} may not {1}: it belongs to another user (that needs {2}:all)": "webapp/services/access.py",
        # a message helper: _fail(name, f"...") in pipelines' request validation
        "`{0}` must be a multiple of 8 but is {1}": "pipelines/types.py",
        # PlanError through deploy.sagemaker.control._fail(attribute, message)
        "{0}: must be an integer, got {1}": "deploy/sagemaker/control.py",
        # a class building its own message in __init__
        "unknown ControlNet preprocessor {0}; see /controlnet/module_list for the names":
            "pipelines/controlnet/preprocessors.py",
        "set `image_uri` (the serving container's ECR image) or the server's STUDIO_SAGEMAKER_IMAGE_URI":
            "deploy/backends/options.py",
        "model file unavailable: {0}": "deploy/runner.py",  # a job's error: Failed(message=...)
        "Choose the user to delete": "webapp/ui/users_tab.py",  # gr.Error
        "cross-site request refused (Sec-Fetch-Site: {0})": "webapp/web/origin.py",  # the gate's refusal
    }
    for template, path in expected.items():
        assert template in found.templates, template
        assert any(site.startswith(path + ":") for site in found.templates[template]), (template, path)
    assert "{0}" not in found.templates and "{0}: {1}" not in found.templates  # would match anything


# -- the extractor on a small tree -------------------------------------------------------------------------------

SAMPLE = '''
from fastapi import HTTPException
import gradio as gr

class ServiceError(Exception):
    pass

class InvalidInput(ServiceError):
    pass

class Mine(InvalidInput):
    pass

class PipelineError(ValueError):
    pass

class Unknown(PipelineError):
    def __init__(self, value):
        super().__init__(f"unknown thing {value!r}; see the list")

def _fail(name, message):
    raise InvalidInput(message)

def _wrap(attribute, message):
    return InvalidInput(f"{attribute}: {message}")

def sites(user, n, what, items):
    raise InvalidInput(f"no user named {user!r}", field="username")
    raise Mine("%s has %d items" % (user, n))
    raise InvalidInput("{} of {} done".format(n, n))
    raise InvalidInput("the first part, " + f"then {n} more")
    hint = " (it may need a token)" if n in (401, 403) else ""
    raise InvalidInput(f"{user} answered HTTP {n}{hint}")
    raise InvalidInput(f"{'one' if n == 1 else 'many'} left")
    raise InvalidInput(str(n))
    raise HTTPException(404, detail=f"no item {n}")
    raise gr.Error("Choose something first")
    raise Unknown(what)
    _fail("width", f"`width` must be a multiple of 8 but is {n}")
    raise _wrap("name", f"must be at most {n} characters")
    raise ValueError(f"not a user message {n}")
    raise InvalidInput(f"`dtype` {what}{n} needs {n} bytes")
'''


def _sample_tree(tmp_path: Path) -> Path:
    (tmp_path / "webapp").mkdir(parents=True)
    (tmp_path / "webapp" / "sample.py").write_text(textwrap.dedent(SAMPLE), encoding="utf-8")
    return tmp_path


def test_the_extractor_turns_each_message_into_a_template(tmp_path):
    found = extractor.extract(_sample_tree(tmp_path))
    assert set(found.templates) == {
        "no user named {0}",
        "{0} has {1} items",
        "{0} of {1} done",
        "the first part, then {0} more",
        "{0} answered HTTP {1}",
        "{0} answered HTTP {1} (it may need a token)",
        "one left",
        "many left",
        "no item {0}",
        "Choose something first",
        "unknown thing {0}; see the list",
        "`width` must be a multiple of 8 but is {0}",
        "{0}: must be at most {1} characters",
        "`dtype` {0} needs {1} bytes",  # two values side by side are one
    }
    # values only (str(n); Unknown(what), whose class builds the text): their own raise sites have the text
    assert found.dynamic == ["webapp/sample.py:35", "webapp/sample.py:38"]


def test_the_extractor_is_deterministic_and_keeps_existing_translations(tmp_path):
    root = _sample_tree(tmp_path / "src")
    locales = tmp_path / "locales"
    locales.mkdir()
    (locales / "ja.json").write_text(json.dumps({
        "ui": {"Save": "保存"},
        "messages": {"no user named {0}": "{0} という名前のユーザーはいません", "an old message {0}": "古い {0}"},
    }, ensure_ascii=False), encoding="utf-8")

    first = extractor.update(root, locales, languages=["ja", "zh-CN"])
    text = (locales / "ja.json").read_bytes()
    second = extractor.update(root, locales, languages=["ja", "zh-CN"])
    assert (locales / "ja.json").read_bytes() == text and first == second

    data = json.loads(text)
    assert data["ui"] == {"Save": "保存"}  # UI strings are left alone
    assert data["messages"]["no user named {0}"] == "{0} という名前のユーザーはいません"  # kept
    assert data["messages"]["no item {0}"] is None  # new: listed as missing
    assert "an old message {0}" not in data["messages"]  # no longer raised anywhere
    assert list(data["messages"]) == sorted(data["messages"])
    assert all(v is None for v in json.loads((locales / "zh-CN.json").read_text("utf-8"))["messages"].values())


def test_check_fails_on_a_missing_or_broken_translation():
    assert extractor.problems("no user named {0}", None) == ["missing"]
    assert extractor.problems("no user named {0}", "用户不存在") == ["drops {0}"]
    assert extractor.problems("no user named {0}", "{0} {1}") == ["invents {1}"]
    assert extractor.problems("no user named {0}", "没有名为 {0} 的用户") == []


# -- (3) matching real messages ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("english", "language", "expected"), [
    # a repr()'d value with a space
    ("no user named 'bob smith'", "ja", "'bob smith' という名前のユーザーはいません"),
    # several values, reordered by the translation
    ("'alice' may not model:update on model 'cat': it belongs to another user (that needs model:all)", "zh-CN",
     "'alice' 无权对 model 'cat' 执行 model:update：它属于另一个用户（这需要 model:all）"),
    ("'alice' may not model:update: it belongs to another user (that needs model:all)", "ja",
     "'alice' は model:update を実行できません：別のユーザーのものです（model:all が必要です）"),
    # a conditional suffix: both variants are templates
    ("https://example.com/x answered HTTP 403 (it may need an access token)", "ja",
     "https://example.com/x が HTTP 403 を返しました（アクセストークンが必要かもしれません）"),
    ("https://example.com/x answered HTTP 500", "ja", "https://example.com/x が HTTP 500 を返しました"),
    # a message without values
    ("cannot delete the last administrator", "zh-CN", "不能删除最后一位管理员"),
    # a value that is itself a message (a preprocessor error inside a unit's field error)
    ("`controlnet.args[0].module` names an unknown ControlNet preprocessor 'nope'; see /controlnet/module_list "
     "for the names", "ja",
     "`controlnet.args[0].module` の指定が無効です：不明な ControlNet プリプロセッサ 'nope' です。名前は "
     "/controlnet/module_list を参照してください"),
    # English stays English; unknown text passes through
    ("no user named 'bob'", "en", "no user named 'bob'"),
    ("something nobody wrote a template for", "ja", "something nobody wrote a template for"),
])
def test_real_messages_match_their_templates(english, language, expected):
    assert translate(english, language) == expected


def test_the_current_language_is_the_default():
    with use_language("zh-CN"):
        assert translate("no user named 'bob'") == "没有名为 'bob' 的用户"
    assert translate("no user named 'bob'") == "no user named 'bob'"


def test_every_template_matches_a_message_built_from_it(found):
    """Each template's pattern matches the text it stands for, whatever the values (spaces, quotes, colons)."""
    values = ["'bob smith'", "12", "a: b; c", "x"]
    for template in found.templates:
        text = extractor._PLACEHOLDER.sub(lambda m: values[int(m.group(1)) % len(values)], template)
        assert template_pattern(template).fullmatch(text), template
        for language in LANGUAGES:
            translated = translate(text, language)
            assert translated != text or extractor.read_catalog(language)["messages"][template] == template, template


# -- (b) real errors come back translated ------------------------------------------------------------------------

def _request(username: str, accept_language: str | None = None) -> gr.Request:
    headers = {"accept-language": accept_language} if accept_language else {}
    return gr.Request(username=username, headers=headers)


def test_a_ui_handler_answers_in_the_browsers_language_then_the_users_choice(studio):
    from webapp.ui.context import UiContext
    from webapp.ui.users_tab import UsersTab

    tab = UsersTab(UiContext(users=studio.users), roles=studio.roles)
    with pytest.raises(gr.Error) as raised:
        tab.delete("ghost user", _request("admin", "ja-JP,ja;q=0.9,en;q=0.8"))
    assert raised.value.message == "'ghost user' という名前のユーザーはいません"

    admin = studio.users.get_by_name("admin")
    studio.users.set_language(actor=admin, language="zh-CN")
    with pytest.raises(gr.Error) as raised:  # the user's choice wins over the browser's
        tab.delete("ghost", _request("admin", "ja"))
    assert raised.value.message == "没有名为 'ghost' 的用户"
    with pytest.raises(gr.Error) as raised:  # a gr.Error the handler raises itself
        tab.delete("", _request("admin"))
    assert raised.value.message == "请选择要删除的用户"

    studio.users.set_language(actor=admin, language=None)
    with pytest.raises(gr.Error) as raised:
        tab.delete("ghost", _request("admin"))
    assert raised.value.message == "no user named 'ghost'"


def test_the_api_answers_detail_in_the_callers_language_keeping_field(studio, admin_client):
    english = admin_client.delete("/api/v1/users/ghost%20user")
    assert english.status_code == 404
    assert english.json() == {"error": "NotFound", "detail": "no user named 'ghost user'", "field": "username"}

    japanese = admin_client.delete("/api/v1/users/ghost%20user", headers={"Accept-Language": "ja,en;q=0.5"})
    assert japanese.status_code == 404
    assert japanese.json() == {"error": "NotFound", "detail": "'ghost user' という名前のユーザーはいません",
                               "field": "username"}

    admin = studio.users.get_by_name("admin")
    studio.users.set_language(actor=admin, language="zh-CN")
    chinese = admin_client.post("/api/v1/users", json={"username": "bad name!", "password": "long-password-1"})
    assert chinese.status_code == 422 and chinese.json()["field"] == "username"
    assert chinese.json()["detail"].startswith("`username` 'bad name!' 无效：")
    chinese = admin_client.delete("/api/v1/users/ghost", headers={"Accept-Language": "ja"})  # the user's choice
    assert chinese.json()["detail"] == "没有名为 'ghost' 的用户"


def test_a1111_routes_answer_in_english_unless_asked(studio, admin_client):
    body = {"prompt": "a cat", "width": 100, "steps": 1}
    plain = admin_client.post("/sdapi/v1/txt2img", json=body)
    asked = admin_client.post("/sdapi/v1/txt2img", json=body, headers={"Accept-Language": "zh-CN"})
    assert plain.status_code == asked.status_code and 400 <= plain.status_code < 500
    assert plain.json()["field"] == asked.json()["field"] and plain.json()["error"] == asked.json()["error"]
    assert plain.json()["detail"] == plain.json()["errors"]  # English, as A1111 answers
    assert asked.json()["detail"] == translate(plain.json()["detail"], "zh-CN") != plain.json()["detail"]
    assert asked.json()["errors"] == plain.json()["errors"]  # the exception's own text stays


def test_the_gate_answers_in_the_requests_language(client):
    plain = client.get("/api/v1/users", headers={"Authorization": "Bearer nope"})
    assert plain.status_code == 401 and plain.json() == {"detail": "Invalid or revoked API token"}
    asked = client.get("/api/v1/users", headers={"Authorization": "Bearer nope", "Accept-Language": "ja"})
    assert asked.status_code == 401 and asked.json() == {"detail": "API トークンが無効か、失効しています"}
    a1111 = client.get("/sdapi/v1/options", headers={"Accept-Language": "zh-CN"})
    assert a1111.status_code == 401 and a1111.json()["detail"] == "未通过身份验证"
    assert a1111.json()["errors"] == "401: Not authenticated"


def test_the_login_page_names_the_problem_in_the_browsers_language(client):
    response = client.post("/login", data={"username": "admin", "password": "wrong", "next": "/ui/"},
                           headers={"Accept-Language": "zh-CN,zh;q=0.9"})
    assert response.status_code == 401 and "用户名或密码错误" in response.text
    login(client, "admin", ADMIN_PASSWORD)
