"""The schema corpus of tests/test_json_schema.py: what LangChain / pydantic clients send.

Most entries are pydantic v2 models' ``model_json_schema()`` (nested models, optional fields,
lists of models, enums, Literal, unions, discriminated unions, dates, UUIDs, ``dict[str, int]``,
constrained ints/floats/strings, tuples, recursion through ``$defs``); a few are written out as
LangChain tool / OpenAI strict-mode schemas. The schemas are stored in tests/data/schemas.json so
that the test needs no pydantic and does not change with pydantic's version. Lists are bounded
(``Field(max_length=...)``, i.e. ``maxItems``) and descriptions worded where the 135M test model
otherwise loops in a list or a dict until the token limit (llama-server with the same grammar
loops the same way). Regenerate with

    python tests/json_schema_corpus.py          (writes tests/data/schemas.json)
"""

from __future__ import annotations

import datetime
import enum
import json
import sys
import uuid
from pathlib import Path
from typing import Annotated, Literal

OUTPUT = Path(__file__).resolve().parent / "data" / "schemas.json"


def pydantic_schemas() -> list[tuple[str, dict]]:
    import pydantic
    from pydantic import BaseModel, Field

    class Color(str, enum.Enum):
        RED = "red"
        GREEN = "green"
        BLUE = "blue"

    class Priority(int, enum.Enum):
        LOW = 1
        MEDIUM = 2
        HIGH = 3

    class Person(BaseModel):
        """A person with a name and an age."""
        name: str
        age: int

    class Address(BaseModel):
        street: str
        city: str
        zip_code: str = Field(pattern=r"^\d{5}$", description="Five digits")

    class Employee(BaseModel):
        """An employee and where they live."""
        name: str
        address: Address
        manager: Person | None = None

    class Team(BaseModel):
        """A team of people."""
        team_name: str
        members: list[Person]

    class Product(BaseModel):
        """A product in a catalogue."""
        name: str
        price: float = Field(ge=0, description="Price in euros")
        in_stock: bool
        tags: list[str] = Field(default_factory=list)

    class Shirt(BaseModel):
        """A shirt and its colour."""
        size: Literal["S", "M", "L", "XL"]
        color: Color

    class Task(BaseModel):
        """A task on a to-do list."""
        title: str
        priority: Priority
        done: bool = False
        due: datetime.date | None = None

    class Meeting(BaseModel):
        """A meeting in a calendar."""
        subject: str
        start: datetime.datetime
        duration_minutes: int = Field(ge=5, le=480)

    class Rating(BaseModel):
        """A movie rating."""
        movie: str
        stars: int = Field(ge=1, le=5)
        comment: str | None = None

    class Inventory(BaseModel):
        """The number of each fruit in a warehouse, keyed by fruit name."""
        warehouse: str
        counts: dict[str, int]

    class Point(BaseModel):
        """A point on a map."""
        label: str
        coordinates: tuple[float, float]

    class Cat(BaseModel):
        pet_type: Literal["cat"]
        meows: int

    class Dog(BaseModel):
        pet_type: Literal["dog"]
        barks: float

    class Owner(BaseModel):
        """A pet owner and their pet."""
        owner: str
        pet: Annotated[Cat | Dog, Field(discriminator="pet_type")]

    class Contact(BaseModel):
        """A phone or an e-mail contact."""
        name: str
        value: int | str

    class TreeNode(BaseModel):
        """A tree of named nodes."""
        name: str
        children: list[TreeNode] = Field(default_factory=list, max_length=3)

    class Ticket(BaseModel):
        """A support ticket."""
        id: uuid.UUID
        subject: str = Field(min_length=3, max_length=60)
        status: Literal["open", "closed"] = "open"

    class Recipe(BaseModel):
        """A cooking recipe."""
        title: str
        servings: int = Field(gt=0, lt=13)
        ingredients: list[str] = Field(min_length=1, max_length=6)
        vegetarian: bool

    class Book(BaseModel):
        """A book with its authors."""
        title: str
        authors: list[Person] = Field(max_length=2)
        year: int = Field(ge=1450, le=2100)
        isbn: str | None = None

    class Library(BaseModel):
        """A small library."""
        name: str
        books: list[Book] = Field(max_length=2)

    class Weather(BaseModel):
        """The weather in a city."""
        city: str
        temperature_celsius: float = Field(ge=-90, le=60)
        conditions: Literal["sunny", "cloudy", "rainy", "snowy"]

    class Event(BaseModel):
        """A dated event."""
        name: str
        date: datetime.date
        time: datetime.time | None = None

    class Sentiment(BaseModel):
        """The sentiment of a sentence."""
        label: Literal["positive", "negative", "neutral"]
        confidence: float = Field(ge=0.0, le=1.0)

    class Entities(BaseModel):
        """Named entities in a text."""
        people: list[str]
        places: list[str]
        organisations: list[str]

    class Answer(BaseModel):
        """An answer with its sources."""
        answer: str
        sources: list[str] = Field(max_length=3)
        follow_up: str | None = None

    class Flags(BaseModel):
        """Feature flags."""
        dark_mode: bool
        beta: bool
        max_users: int | None = None

    class Rgb(BaseModel):
        """A colour as red, green and blue."""
        rgb: tuple[int, int, int]
        name: str

    class Strict(BaseModel):
        """A user record (extra keys forbidden)."""
        model_config = pydantic.ConfigDict(extra="forbid")
        username: str = Field(pattern=r"^[a-z][a-z0-9_]{2,15}$")
        email_verified: bool

    class Order(BaseModel):
        """An order of products."""
        order_id: int
        customer: Person
        items: list[Product] = Field(max_length=2)
        status: Literal["pending", "shipped", "delivered"]

    class Capitals(BaseModel):
        """A continent and the capital of each of its largest countries."""
        name: str
        capitals: dict[str, str]

    class Measurement(BaseModel):
        """A measurement that may be missing."""
        sensor: str
        value: float | None = None
        unit: Literal["C"] | Literal["F"] = "C"

    models = [Person, Employee, Team, Product, Shirt, Task, Meeting, Rating, Inventory, Point, Owner,
              Contact, TreeNode, Ticket, Recipe, Book, Library, Weather, Event, Sentiment, Entities, Answer,
              Flags, Rgb, Strict, Order, Capitals, Measurement]
    return [(f"pydantic:{model.__name__}", model.model_json_schema()) for model in models]


# LangChain tools (convert_to_openai_tool) and OpenAI strict mode: written out as clients send them.
LITERAL_SCHEMAS: list[tuple[str, dict]] = [
    ("langchain:GetWeather", {
        "title": "GetWeather", "description": "Get the current weather in a given location",
        "type": "object",
        "properties": {"location": {"type": "string", "description": "The city and state, e.g. Paris, France"},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"],
    }),
    ("openai-strict:CalendarEvent", {
        "title": "CalendarEvent", "description": "A calendar event with participants",
        "type": "object",
        "properties": {"name": {"type": "string"}, "date": {"type": "string"},
                       "participants": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
        "required": ["name", "date", "participants"], "additionalProperties": False,
    }),
    ("openai-strict:MathReasoning", {
        "title": "MathReasoning", "description": "Solve 2 + 2 in steps",
        "type": "object",
        "properties": {
            "steps": {"type": "array", "items": {"$ref": "#/$defs/step"}, "maxItems": 3},
            "final_answer": {"type": "string"}},
        "$defs": {"step": {"type": "object",
                           "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
                           "required": ["explanation", "output"], "additionalProperties": False}},
        "required": ["steps", "final_answer"], "additionalProperties": False,
    }),
    ("json-schema:NullableTypes", {
        "title": "Profile", "description": "A profile whose nickname may be null",
        "type": "object",
        "properties": {"nickname": {"type": ["string", "null"]}, "age": {"type": ["integer", "null"]},
                       "country": {"const": "FR"}},
        "required": ["nickname", "age", "country"],
    }),
]


def build() -> list[dict]:
    entries = [*pydantic_schemas(), *LITERAL_SCHEMAS]
    return [{"name": name, "schema": schema} for name, schema in entries]


def main() -> int:
    import pydantic

    document = {"generated_by": "tests/json_schema_corpus.py", "pydantic": pydantic.VERSION,
                "python": sys.version.split()[0], "schemas": build()}
    OUTPUT.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(document['schemas'])} schemas -> {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
