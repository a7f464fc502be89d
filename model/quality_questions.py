"""The quality gate's questions: short prompts whose right answers can be checked by keyword.

Kept apart from the scoring code so the set can grow without touching it. Every
question has an accept list of equally right answers (digits and number words,
British and American spellings, either accepted name of a place); ``model.quality``
matches them on word boundaries, so "12" is not found in "120" and "Rome" is not
found in "Romeo". Questions are pitched at what a 135M instruction-tuned model
can answer: the check must see a quantization loss, not the model's ceiling, so
the float32 build is meant to score well but not perfectly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    """A question, the answers any one of which makes a reply right, its category, earlier turns."""

    prompt: str
    accept: tuple[str, ...]
    history: tuple[tuple[str, str], ...] = ()  # (user, assistant) turns before the question
    category: str = "fact"

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages, ending with the question."""
        out = []
        for user, assistant in self.history:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return [*out, {"role": "user", "content": self.prompt}]


def _q(category: str, rows: list[tuple[str, tuple[str, ...]]]) -> tuple[Question, ...]:
    """One category's questions from (prompt, accept) rows."""
    return tuple(Question(prompt, accept, category=category) for prompt, accept in rows)


def _capital(country: str, *city: str) -> tuple[str, tuple[str, ...]]:
    return f"What is the capital of {country}?", city


# The 16-question capitals quiz the model notes measured (fp32 14/16, builder int4 7/16);
# reported on its own so the numbers stay comparable with those notes.
CAPITALS_16: tuple[Question, ...] = _q("capitals-16", [
    _capital("France", "Paris"),
    _capital("Germany", "Berlin"),
    _capital("Italy", "Rome"),
    _capital("Spain", "Madrid"),
    _capital("Japan", "Tokyo"),
    _capital("the United Kingdom", "London"),
    _capital("Egypt", "Cairo"),
    _capital("Canada", "Ottawa"),
    _capital("Russia", "Moscow"),
    _capital("China", "Beijing", "Peking"),
    _capital("Australia", "Canberra"),
    _capital("Brazil", "Brasilia", "Brasília"),
    _capital("India", "New Delhi", "Delhi"),
    _capital("Mexico", "Mexico City", "Ciudad de México", "Ciudad de Mexico"),
    _capital("Greece", "Athens"),
    _capital("Portugal", "Lisbon", "Lisboa"),
])

CAPITALS_MORE: tuple[Question, ...] = _q("capitals", [
    _capital("Ireland", "Dublin"),
    _capital("Norway", "Oslo"),
    _capital("Sweden", "Stockholm"),
    _capital("Austria", "Vienna", "Wien"),
    _capital("Poland", "Warsaw", "Warszawa"),
    _capital("Argentina", "Buenos Aires"),
    _capital("Kenya", "Nairobi"),
    _capital("South Korea", "Seoul"),
    _capital("Thailand", "Bangkok"),
    _capital("Peru", "Lima"),
    _capital("Cuba", "Havana", "La Habana"),
    _capital("Hungary", "Budapest"),
    _capital("the Czech Republic", "Prague", "Praha"),
    _capital("the Netherlands", "Amsterdam"),
    _capital("Denmark", "Copenhagen"),
    _capital("Scotland", "Edinburgh"),
    _capital("New Zealand", "Wellington"),
    _capital("Nigeria", "Abuja"),
    _capital("Chile", "Santiago"),
    _capital("Vietnam", "Hanoi"),
    _capital("Indonesia", "Jakarta"),
    _capital("the Philippines", "Manila"),
    _capital("Ukraine", "Kyiv", "Kiev"),
    _capital("Iran", "Tehran"),
    _capital("Saudi Arabia", "Riyadh"),
    _capital("Switzerland", "Bern", "Berne"),
])


def _n(*forms: str) -> tuple[str, ...]:
    """A number's accepted forms, digits and words ("twenty-two" also matches "twenty two")."""
    return forms


ARITHMETIC: tuple[Question, ...] = _q("arithmetic", [
    ("What is 7 plus 5?", _n("12", "twelve")),
    ("What is 2 plus 2?", _n("4", "four")),
    ("What is 8 plus 8?", _n("16", "sixteen")),
    ("What is 1 plus 1?", _n("2", "two")),
    ("What is 6 times 7?", _n("42", "forty-two")),
    ("What is 5 times 5?", _n("25", "twenty-five")),
    ("What is 10 times 10?", _n("100", "one hundred", "a hundred")),
    ("What is 3 times 3?", _n("9", "nine")),
    ("What is 4 times 2?", _n("8", "eight")),
    ("What is 2 times 8?", _n("16", "sixteen")),
    ("What is 12 divided by 3?", _n("4", "four")),
    ("What is half of 10?", _n("5", "five")),
    ("What is 10 plus 10?", _n("20", "twenty")),
    ("What is 1 plus 2?", _n("3", "three")),
    ("What is 2 times 3?", _n("6", "six")),
    ("What is 2 times 5?", _n("10", "ten")),
    ("What is 9 times 9?", _n("81", "eighty-one")),
    ("What is 10 divided by 2?", _n("5", "five")),
    ("What is 6 minus 1?", _n("5", "five")),
])

UNITS: tuple[Question, ...] = _q("units", [
    ("How many centimetres are in a metre?", _n("100", "one hundred", "a hundred")),
    ("How many minutes are in an hour?", _n("60", "sixty")),
    ("How many days are in a week?", _n("7", "seven")),
    ("How many grams are in a kilogram?", _n("1000", "1,000", "one thousand", "a thousand")),
    ("How many seconds are in a minute?", _n("60", "sixty")),
    ("How many hours are in a day?", _n("24", "twenty-four")),
    ("How many months are in a year?", _n("12", "twelve")),
    ("How many days are in a year?", _n("365", "three hundred and sixty-five",
                                         "three hundred sixty-five")),
    ("How many metres are in a kilometre?", _n("1000", "1,000", "one thousand", "a thousand")),
    ("How many years are in a century?", _n("100", "one hundred", "a hundred")),
    ("How many years are in a decade?", _n("10", "ten")),
    ("How many cents are in a dollar?", _n("100", "one hundred", "a hundred")),
    ("How many feet are in a yard?", _n("3", "three")),
    ("How many seconds are in an hour?", _n("3600", "3,600", "three thousand six hundred")),
    ("How many inches are in a foot?", _n("12", "twelve")),
])


def _opp(word: str, *answers: str) -> tuple[str, tuple[str, ...]]:
    return f"What is the opposite of {word}?", answers


OPPOSITES: tuple[Question, ...] = _q("opposites", [
    _opp("hot", "cold"),
    _opp("big", "small", "little", "tiny"),
    _opp("up", "down"),
    _opp("day", "night"),
    _opp("happy", "sad", "unhappy"),
    _opp("fast", "slow"),
    _opp("black", "white"),
    _opp("open", "closed", "close", "shut"),
    _opp("tall", "short"),
    _opp("wet", "dry"),
    _opp("left", "right"),
    _opp("good", "bad", "evil"),
    _opp("full", "empty"),
    _opp("hard", "soft", "easy"),
    _opp("push", "pull"),
    _opp("rich", "poor"),
    _opp("love", "hate", "hatred"),
    _opp("north", "south"),
    _opp("east", "west"),
    _opp("true", "false", "untrue"),
    _opp("early", "late"),
    _opp("old", "young", "new"),
    _opp("light", "dark", "darkness", "heavy"),
    _opp("win", "lose", "loss"),
    _opp("near", "far"),
    _opp("thick", "thin"),
    _opp("strong", "weak"),
    _opp("inside", "outside"),
    _opp("before", "after"),
    _opp("friend", "enemy", "foe"),
    _opp("clean", "dirty"),
])

FACTS: tuple[Question, ...] = _q("fact", [
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet do we live on?", ("Earth",)),
    ("What is the star at the centre of our solar system called?", ("Sun",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("Who wrote the Harry Potter books?", ("Rowling",)),
    ("Who wrote Pride and Prejudice?", ("Austen",)),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("Who was the first person to walk on the Moon?", ("Armstrong",)),
    ("Who invented the telephone?", ("Bell",)),
    ("What is H2O commonly called?", ("water",)),
    ("What is the chemical formula for water?", ("H2O", "H₂O")),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What gas do plants take in from the air?", ("carbon dioxide", "CO2", "CO₂")),
    ("What gas do humans need to breathe to live?", ("oxygen",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("How many sides does a triangle have?", _n("3", "three")),
    ("How many sides does a hexagon have?", _n("6", "six")),
    ("What colour is the sky on a clear day?", ("blue",)),
    ("What is the largest animal on Earth?", ("blue whale", "whale")),
    ("At what temperature in Celsius does water freeze?", _n("0", "zero")),
    ("At what temperature in Celsius does water boil?", _n("100", "one hundred", "a hundred")),
    ("What language is spoken in Brazil?", ("Portuguese",)),
    ("What language is mainly spoken in France?", ("French",)),
    ("What is the currency of Japan?", ("yen",)),
    ("What is the currency of the United Kingdom?", ("pound", "pounds", "sterling")),
    ("What is the currency of the United States?", ("dollar", "dollars")),
    ("What language is spoken in Spain?", ("Spanish", "Castilian")),
    ("What language is spoken in Germany?", ("German",)),
    ("How many sides does a square have?", _n("4", "four")),
    ("How many fingers are on one hand?", _n("5", "five")),
    ("How many legs does a cat have?", _n("4", "four")),
    ("How many wheels does a bicycle have?", _n("2", "two")),
    ("What do cows produce?", ("milk",)),
    ("What is the name of our galaxy?", ("Milky Way",)),
    ("Which planet is closest to the Sun?", ("Mercury",)),
    ("What is the natural satellite of the Earth called?", ("Moon",)),
    ("Who wrote Hamlet?", ("Shakespeare",)),
    ("Who painted the ceiling of the Sistine Chapel?", ("Michelangelo",)),
    ("Who discovered penicillin?", ("Fleming",)),
    ("Who wrote the Odyssey?", ("Homer",)),
    ("Who was the first person in space?", ("Gagarin",)),
    ("Who composed the Moonlight Sonata?", ("Beethoven",)),
    ("Who wrote War and Peace?", ("Tolstoy",)),
    ("What is the chemical symbol for iron?", ("Fe",)),
    ("What is the chemical symbol for sodium?", ("Na",)),
    ("What is NaCl commonly called?", ("salt", "table salt")),
    ("What is the main gas in the air we breathe?", ("nitrogen",)),
    ("What is the largest desert in the world?", ("Sahara", "Antarctic", "Antarctica")),
    ("What is the longest river in the world?", ("Nile", "Amazon")),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("In which city is the Eiffel Tower?", ("Paris",)),
    ("In which city is the Colosseum?", ("Rome",)),
    ("In which city is the Statue of Liberty?", ("New York",)),
    ("What is the study of living things called?", ("biology",)),
    ("What is the centre of an atom called?", ("nucleus",)),
])

INSTRUCTIONS: tuple[Question, ...] = _q("instruction", [
    ("Reply with only the word yes.", ("yes",)),
    ("Spell 'cat' backwards.", ("tac", "t-a-c")),
    ("Say hello.", ("hello",)),
    ("Repeat after me: blue sky.", ("blue sky",)),
    ("What day comes after Monday?", ("Tuesday",)),
    ("Translate 'thank you' into Spanish.", ("gracias",)),
    ("What is the plural of mouse?", ("mice",)),
    ("What is the plural of child?", ("children",)),
    ("What is the plural of foot?", ("feet",)),
    ("What is the plural of tooth?", ("teeth",)),
    ("What is the plural of man?", ("men",)),
    ("What is the plural of woman?", ("women",)),
    ("What is the past tense of go?", ("went",)),
    # "May" left out: as a verb it is in many wrong answers too.
    ("Name a month of the year.", ("January", "February", "March", "April", "June", "July",
                                   "August", "September", "October", "November", "December")),
    ("Name a fruit.", ("apple", "apples", "banana", "bananas", "orange", "oranges", "mango", "mangoes",
                       "grape", "grapes", "pear", "pears", "strawberry", "strawberries", "cherry",
                       "cherries", "lemon", "lemons", "peach", "peaches", "pineapple", "watermelon",
                       "kiwi", "plum", "plums")),
    ("Give me a word that rhymes with cat.", ("hat", "bat", "mat", "rat", "sat", "fat", "pat",
                                              "flat", "chat", "gnat", "vat", "spat")),
])

HISTORY: tuple[Question, ...] = (
    # DESIGN.md's memory case: the product feeds the whole conversation back every turn.
    Question("What is my dog's name?", ("Biscuit",), category="history",
             history=(("I have a dog called Biscuit.", "That is a lovely name for a dog!"),)),
    Question("What is my name?", ("Sam",), category="history",
             history=(("Hi, my name is Sam.", "Nice to meet you, Sam! How can I help you today?"),)),
    Question("What is my favourite colour?", ("green",), category="history",
             history=(("My favourite colour is green.", "Green is a lovely colour!"),)),
)

QUESTIONS: tuple[Question, ...] = (CAPITALS_16 + CAPITALS_MORE + ARITHMETIC + UNITS + OPPOSITES
                                   + FACTS + INSTRUCTIONS + HISTORY)
