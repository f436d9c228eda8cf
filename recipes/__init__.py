"""Built-in recipes (YAML), installed as zoo.recipes so `recipe=NAME` finds them from anywhere."""
