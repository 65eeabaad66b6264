"""The README's library examples are all found, and each is Python that compiles
(the integration tests run them against the real stack)."""

from __future__ import annotations

import pytest

from tests.unit.library.readme import EXAMPLES, README, readme_examples


def test_the_readme_marks_exactly_the_examples_the_integration_tests_run() -> None:
    assert sorted(readme_examples()) == sorted(EXAMPLES)
    assert README.read_text().count("<!-- example:") == len(EXAMPLES)  # none with a broken fence


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_readme_example_compiles_and_reads_its_settings_from_the_environment(name: str) -> None:
    code = readme_examples()[name]
    compile(code, f"README example {name}", "exec")
    assert 'os.environ["TS_AUTHKEY"]' in code and '"TS_LOGIN_SERVER"' in code and '"TS_CA_FILE"' in code
