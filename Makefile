test:
	python -m pytest -q

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .

bench:
	python -m bench

selfcheck:
	fastppo selfcheck

.PHONY: test lint format bench selfcheck
