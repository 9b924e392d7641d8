# Sourced by launch.sh and test.sh: make .venv once and keep it in step with a requirements file.
# The install is skipped when the requirements file is unchanged since the last successful one.
ensure_venv() {
    local req="$1" stamp
    [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv || return 1
    stamp=".venv/.installed-$(basename "$req")"
    if ! cat requirements*.txt 2>/dev/null | cmp -s - "$stamp"; then
        .venv/bin/python -m pip install --quiet --upgrade pip &&
        .venv/bin/python -m pip install --quiet -r "$req" || return 1
        if [ -f requirements-nodeps.txt ]; then  # spandrel without its torchvision dependency
            .venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt || return 1
        fi
        cat requirements*.txt > "$stamp"
    fi
}
