"""`resnetlab recipes [NAME]`: the named training recipes; with NAME, its full resolved config."""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("recipes", help="list the training recipes (or show one as a full config)")
    parser.add_argument("name", nargs="?", help="a recipe to show as the full config it resolves to")
    parser.set_defaults(func=run)


def run(args) -> int:
    from resnetlab.experiments.recipes import DEFAULT_RECIPE, get_recipe, list_recipes

    if args.name:
        from resnetlab.config import build_config

        recipe = get_recipe(args.name)
        print(f"# {recipe.name}: {recipe.description}\n# source: {recipe.source}")
        print(json.dumps(build_config(recipe.name).to_dict(), indent=2))
        return 0
    recipes = list_recipes()
    width = max(len(r.name) for r in recipes)
    for recipe in recipes:
        marker = " (default)" if recipe.name == DEFAULT_RECIPE else ""
        print(f"{recipe.name:<{width}}  {recipe.description}{marker}")
    return 0
