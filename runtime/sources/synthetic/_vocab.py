"""Word pools the scenes draw their text from, and the fixed pool of invented brand names.

The brand pool is seeded by a constant, not the user seed, so brand names match across seeds.
"""

from __future__ import annotations

import functools
import random


def _words(s: str) -> tuple[str, ...]:
    return tuple(s.split())


_COMMON = _words(
    "open sale fresh new free best hot cold daily special organic natural classic original "
    "premium deluxe super extra value family market city park street center north south east "
    "west river lake hill garden house home kitchen coffee tea bread pizza burger taxi hotel bank "
    "school library museum station airport exit entrance parking welcome thanks please stop go "
    "slow notice private office room floor door push pull only way left right up down time day "
    "night week today morning evening love life world music art food drink water juice milk "
    "cafe shop store club bar grill books toys games sport gold silver star sun moon sky "
    "happy lucky royal grand great little big old good fine fast easy quick smart clean clear "
    "light power pure fun play kids baby pet dog cat tree flower apple lemon berry honey sugar "
    "salt pepper spice cream cheese butter chicken rice soup salad cookie cake snack candy "
    "chocolate mint cherry mango peach grape coconut lime service call now info more details "
    "visit online order pickup delivery since made with real quality guaranteed net weight "
    "contains ingredients serving store keep dry cool place use before see bottom side"
)
_FIRST = _words(
    "James Mary Robert Linda Michael Sarah David Karen Daniel Laura Paul Emma Mark Anna Peter "
    "Grace Steven Helen Kevin Julia Brian Nora Thomas Alice Henry Clara Jacob Ruth Samuel Irene "
    "Oliver Vera Lucas Elena Simon Diana Victor Rosa Martin Eva"
)
_LAST = _words(
    "Smith Johnson Brown Miller Davis Wilson Moore Taylor Clark Lewis Walker Hall Young King "
    "Wright Scott Green Baker Adams Nelson Carter Mitchell Turner Parker Collins Morgan Cooper "
    "Reed Bailey Bell Murphy Rivera Cook Rogers Ward Foster Gray Hughes Price Bennett Wood Ross "
    "Hayes Fisher Ellis Stone Hunt Porter Mason Grant"
)
_STREETS = _words(
    "Maple Oak Pine Elm Cedar Main Park Lake Hill Church Market Broad Spring Mill River Walnut "
    "Willow Sunset Highland Union Franklin Lincoln Madison Jackson Center Bay Harbor Forest "
    "Lincoln Grove Meadow Valley Ridge Birch Aspen"
)
_STREET_SUFFIX = _words("St Ave Rd Blvd Ln Dr Way")
_STATES = _words(
    "OREGON TEXAS OHIO IOWA MAINE UTAH IDAHO NEVADA GEORGIA FLORIDA ALASKA KANSAS VERMONT "
    "ARIZONA MONTANA INDIANA NEBRASKA COLORADO VIRGINIA MICHIGAN ILLINOIS KENTUCKY WYOMING "
    "HAWAII DELAWARE MISSOURI ALABAMA"
)
_SLOGANS = (
    "Pacific Wonderland", "Land of Lincoln", "Sunshine State", "Garden State", "Great Lakes",
    "Live Free or Die", "Empire State", "Lone Star State", "Natural State", "Big Sky Country",
    "Famous Potatoes", "Wild Wonderful", "Green Mountains", "Heart of It All", "Silver State",
)
_ITEMS = _words(
    "Bananas Apples Tomatoes Avocados Grapes Carrots Potatoes Onions Lemons Peppers Mangoes "
    "Cherries Broccoli Lettuce Cucumbers Pears Peaches Limes Oranges Bread Milk Eggs Coffee "
    "Cheese Yogurt Butter Rice Pasta Cereal Melons"
)
_PRODUCTS = _words(
    "Crackers Cereal Cookies Tea Pasta Soap Blocks Crayons Puzzle Tissues Oats Chips Candy "
    "Pretzels Rice Noodles Biscuits Granola"
)
_FLAVORS = _words(
    "Lemon Cherry Mango Mint Original Cola Orange Lime Berry Vanilla Peach Grape Ginger Apple "
    "Coconut"
)
_STORE_TYPES = _words(
    "BAKERY CAFE BOOKS PHARMACY MARKET DELI SALON PIZZA HARDWARE FLORIST DINER TAILOR GROCERY "
    "BARBER OPTICAL JEWELRY LAUNDRY TOYS"
)
_INFO_SIGNS = (
    "EXIT", "PARKING", "ONE WAY", "NO PARKING", "RESTROOMS", "ENTRANCE", "PUSH", "PULL",
    "PRIVATE", "KEEP OUT", "NO SMOKING", "BUS STOP", "TAXI", "HOTEL", "OPEN", "TICKETS", "YIELD",
    "DETOUR", "LOADING ZONE", "FIRE LANE", "STAFF ONLY", "INFORMATION",
)
_WARN_HEAD = ("WARNING", "DANGER", "CAUTION", "NOTICE")
_WARN_SUB = (
    "WET FLOOR", "HARD HAT AREA", "HIGH VOLTAGE", "CONTROLLED AREA", "KEEP OUT", "NO ENTRY",
    "CONSTRUCTION", "THIN ICE", "GUARD DOG", "FALLING ROCKS", "SLIPPERY", "DEEP WATER",
)
_POSTER_PHRASES = (
    ("BIG", "SALE"), ("FRESH", "COFFEE"), ("LIVE", "MUSIC"), ("GRAND", "OPENING"),
    ("SUMMER", "FESTIVAL"), ("HAPPY", "HOUR"), ("FREE", "WIFI"), ("BOOK", "FAIR"),
    ("FARMERS", "MARKET"), ("JAZZ", "NIGHT"), ("HOT", "DEALS"), ("NEW", "ARRIVALS"),
    ("CITY", "MARATHON"), ("FOOD", "TRUCKS"), ("ART", "SHOW"), ("DANCE", "PARTY"),
    ("YARD", "SALE"), ("FILM", "NIGHT"), ("SPRING", "CLEARANCE"), ("VOTE", "TODAY"),
)
_ADJ = _words(
    "Silent Hidden Last Lost Broken Golden Secret Dark Wild Quiet Burning Frozen Distant Endless "
    "Crimson Little Long Empty Bright Hollow Paper Iron Glass Velvet"
)
_NOUN = _words(
    "River Garden Kingdom Road House Mountain City Ocean Star Forest Winter Summer Island Bridge "
    "Letter Door Dream Shadow Fire Storm Valley Harbor Light Sky Machine Orchard Song Tide"
)
_APPS = _words(
    "Mail Maps Camera Music Photos Weather Clock Notes Phone Messages Settings Calendar News "
    "Wallet Books Store Health Files Video Radio"
)
_DAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
_DAY_FULL = dict(zip(_DAYS, ("monday", "tuesday", "wednesday", "thursday", "friday",
                             "saturday", "sunday")))
_JUNK = ("I", "l", "a", "1", "7h", "1E", "..", "|", "-", "o", "ii", "A", "'", "r", "TM", "&")


@functools.lru_cache(maxsize=1)
def _brands() -> tuple[str, ...]:
    """A fixed pool of ~400 invented brand-like names (independent of the user seed)."""
    r = random.Random("vlmspec-brand-pool-v1")
    on = ("b br c cr d dr f fl g gr h j k kl l m n p pl pr qu r s sh sk sl sp st t tr v w z "
          "x ch").split()
    vo = "a e i o u a o e ai ea oo y".split()
    co = ["", "", "", "n", "r", "x", "k", "l", "m", "s", "t", "ck", "nd", "st", "ll", "z", "v"]
    suf = ["", "", "", "o", "a", "ex", "ix", "ly", "on", "io", "us", "ia", "er"]
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < 400:
        n = r.choice((1, 2, 2, 2, 3))
        w = "".join(r.choice(on) + r.choice(vo) + r.choice(co) for _ in range(n)) + r.choice(suf)
        if not 4 <= len(w) <= 9 or w in seen:
            continue
        seen.add(w)
        x = r.random()
        if x < 0.12 and len(w) <= 7:  # hyphenated two-part brand, e.g. "Kel-Vora"
            w2 = r.choice(on) + r.choice(vo) + r.choice(co) + r.choice(("a", "o", "i", ""))
            w = f"{w.title()}-{w2.title()}"
        elif x < 0.20 and len(w) <= 7:  # two-word brand, e.g. "Mira Pop"
            w = f"{w.title()} {r.choice(('Pop', 'Co', 'Max', 'Go', 'One', 'Fresh', 'Joy'))}"
        else:
            w = w.title()
        out.append(w)
    return tuple(out)


def _brand(r: random.Random, max_len: int = 12) -> str:
    pool = _brands()
    while True:
        b = r.choice(pool)
        if len(b) <= max_len:
            return b


def _style(r: random.Random, s: str, p_upper: float = 0.5) -> str:
    x = r.random()
    return s.upper() if x < p_upper else (s.lower() if x > 0.92 else s)
