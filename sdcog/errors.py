"""The error every input rule raises: its message starts with the field's name."""


class InputError(ValueError):
    """An input breaks a rule. The message names the field, the rule and the value."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
