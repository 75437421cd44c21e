"""How a drain is planned and run: named steps under the notice's deadline."""
