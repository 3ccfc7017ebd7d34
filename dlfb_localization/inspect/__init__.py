"""Looking inside data and models: figures and numbers. Imports matplotlib lazily."""
